// PM2 process file for crm-relay, from a checkout where `scripts/run` (or
// `python3 -m venv .venv && .venv/bin/pip install --require-hashes -r requirements.lock &&
// .venv/bin/pip install --no-deps .`) made .venv:  pm2 start deploy/ecosystem.config.js
// Another venv: CRM_RELAY_VENV=/opt/crm-relay/venv pm2 start deploy/ecosystem.config.js
//
// Shutdown: PM2 sends SIGINT, then SIGKILL after kill_timeout. crm-relay drains in-flight HTTP
// requests (2 s), lets the worker finish its CRM calls (8 s) and exits 0 within those 10 s;
// kill_timeout adds 2 s of margin. A SIGKILL would cost a redelivery, never a lead, but is noisy.
const path = require("path");

const root = path.resolve(__dirname, "..");
const venv = path.resolve(root, process.env.CRM_RELAY_VENV || ".venv");
// absolute: the embedded database and the spool do not move with PM2's working directory
const dataDir = path.resolve(root, process.env.CRM_RELAY_DATA_DIR || "var");
const log = path.join(dataDir, "log", "crm-relay.log");

module.exports = {
  apps: [
    {
      name: "crm-relay",
      cwd: root,
      script: path.join(venv, "bin", "crm-relay"),
      args: "serve",
      interpreter: "none", // a console script with its own shebang, not a Node.js file
      exec_mode: "fork", // PM2's cluster mode is for Node.js only
      instances: 1, // more processes need DATABASE_URL (shared PostgreSQL), docs/scaling.md
      autorestart: true,
      min_uptime: "30s", // a process that dies sooner counts as a failed start
      max_restarts: 20,
      exp_backoff_restart_delay: 500, // 0.5 s, 0.75 s, ... up to 15 s between crash restarts
      max_memory_restart: "400M",
      kill_timeout: 12000,
      // one log: crm-relay writes every line to stderr, a crash's traceback too; merge_logs keeps
      // it one file (no -<id> suffix) if instances goes up
      out_file: log,
      error_file: log,
      merge_logs: true,
      env: {
        LOG_FORMAT: "json",
        LOG_LEVEL: "INFO",
        PORT: "8080",
        CRM_RELAY_DATA_DIR: dataDir,
        // secrets (ADMIN_TOKEN, WEBHOOK_SECRET, AMOCRM_*, TELEGRAM_*) belong in the environment
        // PM2 starts in, not in this file
      },
    },
  ],
};
