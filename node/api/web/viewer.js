// The job's .glb in 3D (three.js, served by the node): each structure in its colour, with
// visibility and opacity per structure, reset / anterior / lateral views and the patient's
// orientation (A/P, L/R, S/I) around the model. The glTF frame is x = patient left,
// y = superior, z = anterior (dicom_out/gltf.py).
import * as THREE from 'three';
import { GLTFLoader } from 'three/addons/loaders/GLTFLoader.js';
import { OrbitControls } from 'three/addons/controls/OrbitControls.js';

const AXES = [ // letter, direction in the glTF frame
  ['L', [1, 0, 0]], ['R', [-1, 0, 0]], ['S', [0, 1, 0]], ['I', [0, -1, 0]], ['A', [0, 0, 1]], ['P', [0, 0, -1]]];
const VIEWS = { // camera direction from the centre, and its up
  anterior: [[0, 0, 1], [0, 1, 0]], left: [[1, 0, 0], [0, 1, 0]], right: [[-1, 0, 0], [0, 1, 0]],
  reset: [[0.6, 0.35, 1], [0, 1, 0]],
};

function el(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [k, v] of Object.entries(attributes)) {
    if (k.startsWith('on')) element.addEventListener(k.slice(2), v); else element.setAttribute(k, v);
  }
  element.append(...children);
  return element;
}

export function showModel(container, url, token, structures) {
  const width = Math.min(container.clientWidth || 800, 900);
  const height = Math.round(width * 0.62);
  const stage = el('div', { class: 'stage' });
  stage.style.width = `${width}px`;
  stage.style.height = `${height}px`;
  const panel = el('div', { class: 'structures', id: 'structure-panel' });
  const buttons = el('div', { class: 'views' });
  container.replaceChildren(el('div', { class: 'viewer' }, stage, panel), buttons);

  const renderer = new THREE.WebGLRenderer({ antialias: true, preserveDrawingBuffer: true });
  renderer.setPixelRatio(1);
  renderer.setSize(width, height);
  renderer.setClearColor(0x1b1f24);
  renderer.domElement.id = 'canvas3d';
  stage.append(renderer.domElement);
  const labels = AXES.map(([letter]) => {
    const label = el('span', { class: 'orientation', 'data-axis': letter }, letter);
    stage.append(label);
    return label;
  });

  const scene = new THREE.Scene();
  const camera = new THREE.PerspectiveCamera(30, width / height, 0.001, 100);
  scene.add(new THREE.AmbientLight(0xffffff, 1.3));
  const light = new THREE.DirectionalLight(0xffffff, 1.9);
  camera.add(light); // a headlight: whatever faces the viewer is lit
  scene.add(camera);
  const controls = new OrbitControls(camera, renderer.domElement);
  const box = new THREE.Box3();
  const centre = new THREE.Vector3();
  let radius = 0.2;

  function render() {
    renderer.render(scene, camera);
    const c = centre.clone().project(camera);
    AXES.forEach(([, direction], i) => {
      const point = centre.clone().addScaledVector(new THREE.Vector3(...direction), radius * 0.8).project(camera);
      const x = (point.x + 1) / 2 * width;
      const y = (1 - point.y) / 2 * height;
      const apart = Math.hypot((point.x - c.x) * width, (point.y - c.y) * height) > 40; // not seen end-on
      labels[i].style.left = `${x}px`;
      labels[i].style.top = `${y}px`;
      labels[i].style.visibility = apart && point.z < 1 ? 'visible' : 'hidden';
    });
  }

  function look(name) {
    const [direction, up] = VIEWS[name];
    const d = new THREE.Vector3(...direction).normalize();
    camera.up.set(...up);
    camera.position.copy(centre).addScaledVector(d, radius / Math.sin(THREE.MathUtils.degToRad(15)) * 1.05);
    controls.target.copy(centre);
    controls.update();
    render();
  }
  controls.addEventListener('change', render);
  for (const [name, text] of [['reset', 'Reset'], ['anterior', 'Anterior'], ['left', 'Left lateral'], ['right', 'Right lateral']]) {
    buttons.append(el('button', { type: 'button', id: `view-${name}`, onclick: () => look(name) }, text));
  }

  const loader = new GLTFLoader();
  loader.setRequestHeader({ Authorization: `Bearer ${token}` });
  loader.load(url, (gltf) => {
    scene.add(gltf.scene);
    gltf.scene.updateMatrixWorld(true);
    box.setFromObject(gltf.scene);
    box.getCenter(centre);
    radius = box.getSize(new THREE.Vector3()).length() / 2;
    const volumes = Object.fromEntries(structures.map((s) => [s.name, s.volume_ml]));
    const meshes = [];
    gltf.scene.traverse((node) => { if (node.isMesh) meshes.push(node); });
    for (const mesh of meshes) {
      const name = mesh.name; // the glTF node's: the structure's label name
      const material = mesh.material;
      const colour = `#${material.color.getHexString(THREE.SRGBColorSpace)}`;
      const visible = el('input', { type: 'checkbox', 'data-structure': name, 'aria-label': `show ${name}` });
      visible.checked = true;
      visible.addEventListener('change', () => { mesh.visible = visible.checked; render(); });
      const opacity = el('input', { type: 'range', min: '0', max: '1', step: '0.05', 'data-opacity': name, 'aria-label': `opacity of ${name}` });
      opacity.value = String(material.opacity);
      opacity.addEventListener('input', () => {
        material.opacity = Number(opacity.value);
        material.transparent = material.opacity < 1;
        material.depthWrite = material.opacity >= 1;
        material.needsUpdate = true;
        render();
      });
      const swatch = el('span', { class: 'swatch' });
      swatch.style.background = colour;
      panel.append(el('label', { class: 'structure' }, visible, swatch, ` ${name} `,
        el('span', { class: 'muted' }, volumes[name] !== undefined ? `${volumes[name]} ml` : ''), opacity));
      if (material.transparent) material.depthWrite = false; // see-through ones (the body) never hide others
    }
    look('reset');
    container.dataset.loaded = String(meshes.length);
  }, undefined, (error) => {
    container.append(el('p', { class: 'error' }, `Cannot show the 3D model: ${error.message || error}`));
    container.dataset.loaded = 'error';
  });
}
