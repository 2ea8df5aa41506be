"""TotalSegmentator ``total`` task (v2, 117 classes) -> coded meaning and colour.

(The terms, codes and colours of every output object depend on it; ``TOTALSEG_TERMS`` is the
interface, ``terminology.term_for`` reads it after our own table, ``anatomy``.)

Which concept each class gets follows TotalSegmentator's own SNOMED CT mapping
(resources/totalsegmentator_snomed_mapping.csv), with these corrections so every code is current
and, where the DICOM standard lists the concept, a member of CID 7151 with the standard's meaning:

- category: CID 7150 "Anatomical Structure" is SCT 91723000, not 123037004 (see ``term``);
  "Morphologically Abnormal Structure" (49755003) is the kidney cysts' category, with the kidney
  as Anatomic Region and the side as its modifier;
- subclavian arteries: 29700009 is *Right* subclavian artery in SNOMED CT; both sides use
  36765005 "Subclavian artery" (CID 7151) with a laterality modifier instead;
- left atrial appendage: 33626005 "Left auricular appendage" (CID 7151), which carries its side;
- code meanings as PS3.16 spells them (e.g. "Innominate artery", "Thyroid", "Bladder").

Concepts the standard's tables do not list (individual ribs, gluteal muscles, S1, deep back
muscles, portal and splenic vein) keep TotalSegmentator's SNOMED CT code. Paired structures carry
a laterality modifier (CID 244). Colours: every structure its own, organ colours after 3D
Slicer's anatomy palette, and ramps with alternating lightness for the long series (vertebrae,
ribs), so neighbours differ on screen.
"""

from __future__ import annotations

import colorsys

from pydicom.sr.coding import Code

from vesalius.inference.terminology.anatomy import TERMS
from vesalius.inference.terminology.term import (
    ANATOMICAL_STRUCTURE,
    LEFT,
    MORPHOLOGICALLY_ABNORMAL,
    RIGHT,
    Term,
)

_SIDES = {"left": LEFT, "right": RIGHT}


def _sct(value: str, meaning: str) -> Code:
    return Code(value, "SCT", meaning)


def _ramp(n: int, hue0: float, hue1: float, saturation: float) -> list[tuple[int, int, int]]:
    """``n`` colours along a hue range, lightness alternating so neighbours stand apart."""
    out = []
    for i in range(n):
        hue = hue0 + (hue1 - hue0) * i / max(n - 1, 1)
        value = (0.95, 0.78, 0.62)[i % 3]
        r, g, b = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


# name -> (human label, SCT type value, type meaning, rgb); laterality from a _left/_right suffix
_ORGANS: dict[str, tuple[str, str, str, tuple[int, int, int]]] = {
    "spleen": ("Spleen", "78961009", "Spleen", (157, 108, 162)),
    "kidney_right": ("Right kidney", "64033007", "Kidney", (185, 102, 83)),
    "kidney_left": ("Left kidney", "64033007", "Kidney", (205, 112, 93)),
    "gallbladder": ("Gallbladder", "28231008", "Gallbladder", (139, 150, 98)),
    "stomach": ("Stomach", "69695003", "Stomach", (216, 132, 105)),
    "pancreas": ("Pancreas", "15776009", "Pancreas", (249, 180, 111)),
    "adrenal_gland_right": ("Right adrenal gland", "23451007", "Adrenal gland", (244, 214, 49)),
    "adrenal_gland_left": ("Left adrenal gland", "23451007", "Adrenal gland", (224, 194, 29)),
    "lung_upper_lobe_left": ("Left upper lobe of lung", "45653009", "Upper lobe of lung",
                             (128, 174, 128)),
    "lung_lower_lobe_left": ("Left lower lobe of lung", "90572001", "Lower lobe of lung",
                             (101, 148, 120)),
    "lung_upper_lobe_right": ("Right upper lobe of lung", "45653009", "Upper lobe of lung",
                              (150, 196, 150)),
    "lung_middle_lobe_right": ("Right middle lobe of lung", "72481006",
                               "Middle lobe of right lung", (112, 190, 170)),
    "lung_lower_lobe_right": ("Right lower lobe of lung", "90572001", "Lower lobe of lung",
                              (80, 160, 140)),
    "esophagus": ("Esophagus", "32849002", "Esophagus", (211, 171, 143)),
    "trachea": ("Trachea", "44567001", "Trachea", (182, 228, 235)),
    "thyroid_gland": ("Thyroid gland", "69748006", "Thyroid", (220, 245, 20)),
    "small_bowel": ("Small intestine", "30315005", "Small intestine", (205, 167, 142)),
    "duodenum": ("Duodenum", "38848004", "Duodenum", (255, 253, 229)),
    "colon": ("Colon", "71854001", "Colon", (204, 168, 143)),
    "urinary_bladder": ("Urinary bladder", "89837001", "Bladder", (222, 154, 132)),
    "prostate": ("Prostate", "41216001", "Prostate", (230, 158, 140)),
    "sacrum": ("Sacrum", "54735007", "Sacrum", (212, 188, 102)),
    "heart": ("Heart", "80891009", "Heart", (206, 110, 84)),
    "aorta": ("Aorta", "15825003", "Aorta", (224, 97, 76)),
    "pulmonary_vein": ("Pulmonary vein", "122972007", "Pulmonary vein", (0, 151, 206)),
    "brachiocephalic_trunk": ("Brachiocephalic trunk", "12691009", "Innominate artery",
                              (196, 121, 79)),
    "subclavian_artery_right": ("Right subclavian artery", "36765005", "Subclavian artery",
                                (176, 64, 64)),
    "subclavian_artery_left": ("Left subclavian artery", "36765005", "Subclavian artery",
                               (196, 84, 84)),
    "common_carotid_artery_right": ("Right common carotid artery", "32062004",
                                    "Common carotid artery", (216, 90, 110)),
    "common_carotid_artery_left": ("Left common carotid artery", "32062004",
                                   "Common carotid artery", (236, 110, 130)),
    "brachiocephalic_vein_left": ("Left brachiocephalic vein", "8887007", "Innominate vein",
                                  (0, 120, 190)),
    "brachiocephalic_vein_right": ("Right brachiocephalic vein", "8887007", "Innominate vein",
                                   (30, 100, 170)),
    "atrial_appendage_left": ("Left atrial appendage", "33626005", "Left auricular appendage",
                              (180, 90, 120)),
    "superior_vena_cava": ("Superior vena cava", "48345005", "Superior vena cava",
                           (0, 141, 226)),
    "inferior_vena_cava": ("Inferior vena cava", "64131007", "Inferior vena cava",
                           (0, 110, 160)),
    "portal_vein_and_splenic_vein": ("Portal and splenic vein", "110765007",
                                     "Portal vein and splenic vein", (0, 170, 180)),
    "iliac_artery_left": ("Left common iliac artery", "73634005", "Common iliac artery",
                          (216, 101, 79)),
    "iliac_artery_right": ("Right common iliac artery", "73634005", "Common iliac artery",
                           (236, 121, 99)),
    "iliac_vena_left": ("Left common iliac vein", "46027005", "Common iliac vein",
                        (60, 130, 220)),
    "iliac_vena_right": ("Right common iliac vein", "46027005", "Common iliac vein",
                         (80, 150, 240)),
    "humerus_left": ("Left humerus", "85050009", "Humerus", (205, 179, 108)),
    "humerus_right": ("Right humerus", "85050009", "Humerus", (225, 199, 128)),
    "scapula_left": ("Left scapula", "79601000", "Scapula", (200, 170, 90)),
    "scapula_right": ("Right scapula", "79601000", "Scapula", (220, 190, 110)),
    "clavicula_left": ("Left clavicle", "51299004", "Clavicle", (190, 160, 110)),
    "clavicula_right": ("Right clavicle", "51299004", "Clavicle", (210, 180, 130)),
    "femur_left": ("Left femur", "71341001", "Femur", (255, 238, 170)),
    "femur_right": ("Right femur", "71341001", "Femur", (235, 218, 150)),
    "hip_left": ("Left hip", "29836001", "Hip", (230, 200, 140)),
    "hip_right": ("Right hip", "29836001", "Hip", (250, 220, 160)),
    "spinal_cord": ("Spinal cord", "2748008", "Spinal cord", (244, 214, 150)),
    "gluteus_maximus_left": ("Left gluteus maximus", "181674001", "Gluteus maximus muscle",
                             (188, 95, 76)),
    "gluteus_maximus_right": ("Right gluteus maximus", "181674001", "Gluteus maximus muscle",
                              (168, 75, 56)),
    "gluteus_medius_left": ("Left gluteus medius", "78333006", "Gluteus medius muscle",
                            (200, 110, 96)),
    "gluteus_medius_right": ("Right gluteus medius", "78333006", "Gluteus medius muscle",
                             (180, 90, 76)),
    "gluteus_minimus_left": ("Left gluteus minimus", "75297007", "Gluteus minimus muscle",
                             (212, 125, 116)),
    "gluteus_minimus_right": ("Right gluteus minimus", "75297007", "Gluteus minimus muscle",
                              (192, 105, 96)),
    "autochthon_left": ("Left autochthonous back muscles", "244849004", "Deep muscle of back",
                        (171, 85, 68)),
    "autochthon_right": ("Right autochthonous back muscles", "244849004",
                         "Deep muscle of back", (151, 65, 48)),
    "iliopsoas_left": ("Left iliopsoas", "68455001", "Iliopsoas muscle", (190, 80, 100)),
    "iliopsoas_right": ("Right iliopsoas", "68455001", "Iliopsoas muscle", (170, 60, 80)),
    "brain": ("Brain", "12738006", "Brain", (250, 250, 225)),
    "skull": ("Skull", "89546000", "Skull", (226, 208, 188)),
    "sternum": ("Sternum", "56873002", "Sternum", (244, 217, 154)),
    "costal_cartilages": ("Costal cartilages", "50016007", "Costal Cartilage", (111, 184, 210)),
}

# Vertebrae, caudal to cranial as TotalSegmentator numbers them (S1 .. C1), CID 7151/7603 codes.
_VERTEBRAE = (
    ("S1", "65985001"), ("L5", "49668003"), ("L4", "11994002"), ("L3", "36470004"),
    ("L2", "14293000"), ("L1", "66794005"), ("T12", "23215003"), ("T11", "12989004"),
    ("T10", "7610001"), ("T9", "82687006"), ("T8", "11068009"), ("T7", "62487009"),
    ("T6", "45296009"), ("T5", "56401006"), ("T4", "73071006"), ("T3", "1626008"),
    ("T2", "53733008"), ("T1", "64864005"), ("C7", "87391001"), ("C6", "36054005"),
    ("C5", "36978003"), ("C4", "5329002"), ("C3", "113205007"), ("C2", "39976000"),
    ("C1", "14806007"),
)

_RIBS = (
    ("First", "48535007"), ("Second", "78247007"), ("Third", "25888004"),
    ("Fourth", "25523003"), ("Fifth", "15339008"), ("Sixth", "59558009"),
    ("Seventh", "24915002"), ("Eighth", "5953002"), ("Ninth", "22565002"),
    ("Tenth", "77644006"), ("Eleventh", "58830002"), ("Twelfth", "43993008"),
)


def _laterality(name: str) -> Code | None:
    for side, code in _SIDES.items():
        if name.endswith(f"_{side}") or f"_{side}_" in name:
            return code
    return None


def _build() -> dict[str, Term]:
    terms: dict[str, Term] = {}
    for name, (label, value, meaning, rgb) in _ORGANS.items():
        if name in TERMS:  # ours already (heart): one row per structure
            terms[name] = TERMS[name]
            continue
        # the left atrial appendage's code names its side already
        modifier = None if name == "atrial_appendage_left" else _laterality(name)
        terms[name] = Term(name, label, ANATOMICAL_STRUCTURE, _sct(value, meaning), modifier, rgb)
    terms["liver"] = TERMS["liver"]
    for (level, value), rgb in zip(_VERTEBRAE, _ramp(len(_VERTEBRAE), 0.08, 0.20, 0.45),
                                   strict=True):
        name = f"vertebrae_{level}"
        terms[name] = Term(name, f"{level} vertebra", ANATOMICAL_STRUCTURE,
                           _sct(value, f"{level} vertebra"), None, rgb)
    for side, hues in (("left", (0.02, 0.14)), ("right", (0.15, 0.27))):
        for number, ((ordinal, value), rgb) in enumerate(
                zip(_RIBS, _ramp(len(_RIBS), *hues, 0.35), strict=True), start=1):
            name = f"rib_{side}_{number}"
            terms[name] = Term(name, f"{side.capitalize()} {ordinal.lower()} rib",
                               ANATOMICAL_STRUCTURE, _sct(value, f"{ordinal} rib"),
                               _SIDES[side], rgb)
    kidney = _sct("64033007", "Kidney")
    for side, rgb in (("left", (120, 200, 230)), ("right", (100, 180, 250))):
        name = f"kidney_cyst_{side}"
        terms[name] = Term(name, f"{side.capitalize()} kidney cyst", MORPHOLOGICALLY_ABNORMAL,
                           _sct("367643001", "Cyst"), None, rgb, region=kidney,
                           region_modifier=_SIDES[side])
    return terms


TOTALSEG_TERMS: dict[str, Term] = _build()

# The "total" task's classes in TotalSegmentator's value order (label value = position + 1),
# as in its label_map_total_v2; inference.models.totalsegmentator numbers its labels from this.
TOTAL_CLASSES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus",
    "trachea", "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate",
    "kidney_cyst_left", "kidney_cyst_right", "sacrum", "vertebrae_S1", "vertebrae_L5",
    "vertebrae_L4", "vertebrae_L3", "vertebrae_L2", "vertebrae_L1", "vertebrae_T12",
    "vertebrae_T11", "vertebrae_T10", "vertebrae_T9", "vertebrae_T8", "vertebrae_T7",
    "vertebrae_T6", "vertebrae_T5", "vertebrae_T4", "vertebrae_T3", "vertebrae_T2", "vertebrae_T1",
    "vertebrae_C7", "vertebrae_C6", "vertebrae_C5", "vertebrae_C4", "vertebrae_C3", "vertebrae_C2",
    "vertebrae_C1", "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk",
    "subclavian_artery_right", "subclavian_artery_left", "common_carotid_artery_right",
    "common_carotid_artery_left", "brachiocephalic_vein_left", "brachiocephalic_vein_right",
    "atrial_appendage_left", "superior_vena_cava", "inferior_vena_cava",
    "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left",
    "iliac_vena_right", "humerus_left", "humerus_right", "scapula_left", "scapula_right",
    "clavicula_left", "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right",
    "spinal_cord", "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left",
    "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left",
    "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain", "skull", "rib_left_1",
    "rib_left_2", "rib_left_3", "rib_left_4", "rib_left_5", "rib_left_6", "rib_left_7",
    "rib_left_8", "rib_left_9", "rib_left_10", "rib_left_11", "rib_left_12", "rib_right_1",
    "rib_right_2", "rib_right_3", "rib_right_4", "rib_right_5", "rib_right_6", "rib_right_7",
    "rib_right_8", "rib_right_9", "rib_right_10", "rib_right_11", "rib_right_12", "sternum",
    "costal_cartilages",
)
