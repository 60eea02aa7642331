// PM2 process file for crm-relay: `pm2 start deploy/ecosystem.config.js` from the repository root
// after `pip install .` (the `crm-relay` console script must be on PATH, e.g. an activated venv).
//
// Shutdown: PM2 sends SIGINT, then SIGKILL after kill_timeout. crm-relay drains in-flight HTTP
// requests (2 s), lets the worker finish its CRM calls (8 s) and exits 0, so kill_timeout leaves
// a margin over those 10 s; a SIGKILL would only cost a redelivery, never a lead, but is noisy.
module.exports = {
  apps: [
    {
      name: "crm-relay",
      script: "crm-relay",
      args: "serve",
      interpreter: "none",
      exec_mode: "fork",
      instances: 1, // more processes need DATABASE_URL (shared PostgreSQL) and REDIS_URL
      autorestart: true,
      min_uptime: "30s", // a process that dies sooner counts as a failed start
      max_restarts: 20,
      exp_backoff_restart_delay: 500, // 0.5 s, 0.75 s, ... up to 15 s between crash restarts
      max_memory_restart: "400M",
      kill_timeout: 12000,
      listen_timeout: 60000, // first start initialises the embedded PostgreSQL
      merge_logs: true,
      env: {
        LOG_FORMAT: "json",
        LOG_LEVEL: "INFO",
        PORT: "8080",
        CRM_RELAY_DATA_DIR: "./var",
        // secrets (ADMIN_TOKEN, AMOCRM_*, TELEGRAM_*) belong in the environment PM2 starts in,
        // not in this file
      },
    },
  ],
};
