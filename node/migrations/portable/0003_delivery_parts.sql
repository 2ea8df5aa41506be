-- which of a job's result objects a delivery sends (node/send.py files_for): 'all'; 'first' (the
-- SEG, SR and Surface Segmentation, queued by the worker while it still writes the 3D preview and
-- the STLs); 'rest' (those, once the first ones were delivered). docs/performance.md
ALTER TABLE deliveries ADD COLUMN part TEXT NOT NULL DEFAULT 'all';
