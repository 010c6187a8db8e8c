CREATE TABLE bench_runs (
	id INTEGER NOT NULL, 
	started_at DATETIME NOT NULL, 
	settings TEXT NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE meta (
	"key" VARCHAR(64) NOT NULL, 
	value TEXT, 
	PRIMARY KEY ("key")
);
CREATE TABLE jobs (
	id INTEGER NOT NULL, 
	content_sha256 VARCHAR(64) NOT NULL, 
	rule_fingerprint VARCHAR(32) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	error_kind VARCHAR(64), 
	error TEXT, 
	next_attempt_at DATETIME, 
	source VARCHAR(16) NOT NULL, 
	folder TEXT NOT NULL, 
	rel_path TEXT NOT NULL, 
	input_path TEXT NOT NULL, 
	input_size INTEGER, 
	input_width INTEGER, 
	input_height INTEGER, 
	input_format VARCHAR(16), 
	input_mode VARCHAR(16), 
	bits INTEGER, 
	output_path TEXT, 
	output_size INTEGER, 
	output_width INTEGER, 
	output_height INTEGER, 
	output_format VARCHAR(16), 
	input_moved_to TEXT, 
	model_id VARCHAR(64) NOT NULL, 
	backend VARCHAR(32), 
	scale FLOAT NOT NULL, 
	outscale FLOAT NOT NULL, 
	mode VARCHAR(16) NOT NULL, 
	device VARCHAR(16), 
	precision VARCHAR(8), 
	rule_json TEXT, 
	worker VARCHAR(128), 
	progress VARCHAR(64), 
	created_at DATETIME NOT NULL, 
	started_at DATETIME, 
	finished_at DATETIME, 
	updated_at DATETIME NOT NULL, 
	t_queue FLOAT, 
	t_decode FLOAT, 
	t_load FLOAT, 
	t_infer FLOAT, 
	t_encode FLOAT, 
	t_write FLOAT, 
	t_metrics FLOAT, 
	t_total FLOAT, 
	bench_run_id INTEGER, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_jobs_content_rule UNIQUE (content_sha256, rule_fingerprint), 
	FOREIGN KEY(bench_run_id) REFERENCES bench_runs (id)
);
CREATE INDEX ix_jobs_state ON jobs (state, next_attempt_at);
CREATE INDEX ix_jobs_model ON jobs (model_id);
CREATE INDEX ix_jobs_created ON jobs (created_at);
CREATE TABLE metrics (
	id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	name VARCHAR(32) NOT NULL, 
	value FLOAT, 
	space VARCHAR(16) NOT NULL, 
	shave INTEGER NOT NULL, 
	reference VARCHAR(16) NOT NULL, 
	protocol TEXT NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_metrics_job_name UNIQUE (job_id, name), 
	FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE
);
CREATE INDEX ix_metrics_name ON metrics (name);
CREATE VIEW job_metrics AS 
SELECT j.id, j.state, j.folder, j.rel_path, j.model_id, j.scale, j.outscale, j.mode, j.device,
  j.input_width, j.input_height, j.output_width, j.output_height, j.t_total, j.t_infer, j.created_at,
  j.finished_at,
  MAX(CASE WHEN m.name = 'psnr_y' THEN m.value END) AS psnr_y,
  MAX(CASE WHEN m.name = 'ssim_y' THEN m.value END) AS ssim_y,
  MAX(CASE WHEN m.name = 'psnr_rgb' THEN m.value END) AS psnr_rgb,
  MAX(CASE WHEN m.name = 'ssim_rgb' THEN m.value END) AS ssim_rgb,
  MAX(CASE WHEN m.name = 'mse_rgb' THEN m.value END) AS mse_rgb,
  MAX(CASE WHEN m.name = 'brisque' THEN m.value END) AS brisque,
  MAX(CASE WHEN m.name = 'lr_psnr_y' THEN m.value END) AS lr_psnr_y,
  MAX(CASE WHEN m.name = 'lr_ssim_y' THEN m.value END) AS lr_ssim_y
FROM jobs j LEFT JOIN metrics m ON m.job_id = j.id
GROUP BY j.id;
CREATE VIEW model_summary AS 
SELECT model_id, scale, mode, COUNT(*) AS jobs,
  SUM(CASE WHEN state = 'done' THEN 1 ELSE 0 END) AS done,
  SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS failed,
  AVG(CASE WHEN state = 'done' THEN t_total END) AS mean_total_s,
  AVG(CASE WHEN state = 'done' THEN t_infer END) AS mean_infer_s,
  AVG(psnr_y) AS mean_psnr_y, AVG(ssim_y) AS mean_ssim_y, AVG(brisque) AS mean_brisque,
  AVG(lr_psnr_y) AS mean_lr_psnr_y
FROM job_metrics GROUP BY model_id, scale, mode;
CREATE VIEW recent_jobs AS 
SELECT id, state, folder, rel_path, model_id, scale, device, t_total, error_kind, error, output_path,
  created_at, finished_at
FROM jobs ORDER BY id DESC;
