-- cancel-scanner: canonical schema for MySQL 8.0+ / MariaDB 10.6+ (InnoDB, utf8mb4).
--
-- The contract is ../shared/design/contract.md; models/tables.py is the typed twin
-- of this file and tests/integration/test_schema_drift.py fails if they disagree.
-- Safe to run twice: every statement is IF NOT EXISTS / OR REPLACE / INSERT IGNORE.
-- This file is the head of the schema, for a fresh database. An existing one (a shop's own
-- goods and goods_order2, or an older cancel-scanner) is brought here by `cancel-scanner migrate`,
-- which adds what is missing and never drops or rewrites anything. The last statement records
-- the schema version; raise it with every change here (README: "Changing the schema").
-- A line "-- backfill TABLE.COLUMN: UPDATE ..." beside a column is what migrate runs, once,
-- right after it added that column to a table that already had rows.
--
-- Flags, the same for every X_scanned / X_success pair:
--   0/0  pending, or waiting for a retry (attempts, next attempt time, last error on the row)
--   1/1  done, exactly once
--   1/0  finished with a permanent failure: an operator must look; the reason is on the row
-- All times are UTC: the daemon sets time_zone='+00:00' on its sessions.

CREATE TABLE IF NOT EXISTS goods (
  id          BIGINT NOT NULL AUTO_INCREMENT,
  name        VARCHAR(128) NOT NULL,
  stock       INT UNSIGNED NOT NULL DEFAULT 0,
  sales       INT UNSIGNED NOT NULL DEFAULT 0,
  created_at  DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'row inserted (UTC)',
  updated_at  DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3) COMMENT 'row last changed (UTC)',
  CONSTRAINT pk_goods PRIMARY KEY (id),
  CONSTRAINT ck_goods_stock_not_negative CHECK (stock >= 0),
  CONSTRAINT ck_goods_sales_not_negative CHECK (sales >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='Sellable goods; stock and sales are unsigned, the last guard against overselling.';

CREATE TABLE IF NOT EXISTS goods_order2 (
  id                     BIGINT NOT NULL AUTO_INCREMENT,
  order_no               VARCHAR(32) NOT NULL COMMENT 'sent to WeChat as out_trade_no',
  user_id                BIGINT NOT NULL,
  merchant_id            BIGINT NOT NULL,
  goods_id               BIGINT NOT NULL,
  quantity               INT UNSIGNED NOT NULL,
  total_amount           INT UNSIGNED NOT NULL COMMENT 'what the user paid, in fen',
  pay_status             TINYINT NOT NULL DEFAULT 0 COMMENT '0 unpaid, 1 paid',
  transaction_id         VARCHAR(32) NULL COMMENT 'WeChat Pay transaction id of the payment',
  paid_at                DATETIME(3) NULL,
  order_status           VARCHAR(16) NOT NULL DEFAULT 'UNPAID' COMMENT 'UNPAID|PAID|SHIPPED|COMPLETED|CANCELLED',
  cancel_source          VARCHAR(16) NULL COMMENT 'MERCHANT|USER|TIMEOUT|SHIP_TIMEOUT: who asked (set with the request; TIMEOUT when nobody did and it was not paid in time, SHIP_TIMEOUT when it was not shipped in time)',
  refund_status          VARCHAR(16) NOT NULL DEFAULT 'NONE' COMMENT 'NONE|REFUNDING|REFUNDED|FAILED',
  wx_progress_scanned    TINYINT NOT NULL DEFAULT 0 COMMENT '1 once the refund''s final WeChat status was written to this order',
  stock_scanned          TINYINT NOT NULL DEFAULT 0 COMMENT 'restore_stock: 0 pending, 1 finished (see stock_success)',
  stock_success          TINYINT NOT NULL DEFAULT 0 COMMENT 'restore_stock: 1 stock given back exactly once; 0 with stock_scanned=1 failed',
  sales_scanned          TINYINT NOT NULL DEFAULT 0 COMMENT 'decrement_sales: 0 pending, 1 finished (see sales_success)',
  sales_success          TINYINT NOT NULL DEFAULT 0 COMMENT 'decrement_sales: 1 sales decremented exactly once; 0 with sales_scanned=1 failed',
  is_deleted             TINYINT NOT NULL DEFAULT 0 COMMENT '1 soft-deleted: never cancelled, never touched by the scanner',
  cancelled_at           DATETIME(3) NULL,
  refunded_at            DATETIME(3) NULL,
  stock_attempts         INT NOT NULL DEFAULT 0 COMMENT 'restore_stock: failed tries so far',
  stock_next_attempt_at  DATETIME(3) NULL COMMENT 'restore_stock: not retried before this time (UTC)',
  stock_last_error       VARCHAR(255) NULL COMMENT 'restore_stock: why the last try failed',
  sales_attempts         INT NOT NULL DEFAULT 0 COMMENT 'decrement_sales: failed tries so far',
  sales_next_attempt_at  DATETIME(3) NULL COMMENT 'decrement_sales: not retried before this time (UTC)',
  sales_last_error       VARCHAR(255) NULL COMMENT 'decrement_sales: why the last try failed',
  cancel_requested_at    DATETIME(3) NULL COMMENT 'intake: a cancel of this unpaid order was accepted; close_unpaid settles its payment first',
  close_scanned          TINYINT NOT NULL DEFAULT 0 COMMENT 'close_unpaid: 0 pending, 1 finished (see close_success)',
  close_success          TINYINT NOT NULL DEFAULT 0 COMMENT 'close_unpaid: 1 settled with WeChat (payment closed, or a lost payment booked); 0 with close_scanned=1 failed',
  close_attempts         INT NOT NULL DEFAULT 0 COMMENT 'close_unpaid: failed tries so far',
  close_next_attempt_at  DATETIME(3) NULL COMMENT 'close_unpaid: not tried before this time (UTC)',
  close_last_error       VARCHAR(255) NULL COMMENT 'close_unpaid: why the last try failed',
  close_lease_owner      VARCHAR(64) NULL COMMENT 'close_unpaid: daemon calling WeChat for this order now',
  close_lease_until      DATETIME(3) NULL COMMENT 'close_unpaid: lease expiry (UTC)',
  channel                VARCHAR(16) NOT NULL DEFAULT 'wechat' COMMENT 'the payment channel the order was paid (or is to be paid) through: wechat, ...',
  cancelled_quantity     INT UNSIGNED NOT NULL DEFAULT 0 COMMENT 'intake: units cancelled so far, partial cancels and the cancel of the rest (0 for cancels before schema 8)',
  parts_quantity         INT UNSIGNED NOT NULL DEFAULT 0 COMMENT 'intake: units cancelled by partial cancels while the order went on (their stock and sales move with their refunds: part_goods; restore_stock and decrement_sales move the rest)',
  refunded_amount        INT UNSIGNED NOT NULL DEFAULT 0 COMMENT 'sync_result: fen WeChat confirmed refunded so far, every refund of the order (0 for refunds before schema 8)',
  refund_turn_at         DATETIME(3) NULL COMMENT 'submit_refund: when a refund of this payment with others last went out (the next waits refund_spacing_seconds)',
  created_at             DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'row inserted (UTC)',
  updated_at             DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3) COMMENT 'row last changed (UTC)',
  CONSTRAINT pk_goods_order2 PRIMARY KEY (id),
  CONSTRAINT uk_goods_order2_order_no UNIQUE KEY (order_no),
  -- restore_stock polls: stock_scanned=0 AND stock_success=0 AND order_status='CANCELLED' AND refund_status IN ('NONE','REFUNDED');
  -- `status` counts done (1/1) and failed (1/0) on the first two columns alone
  INDEX idx_goods_order2_stock_pending (stock_scanned, stock_success, order_status, refund_status, is_deleted),
  -- decrement_sales polls: sales_scanned=0 AND sales_success=0 AND order_status='CANCELLED' AND refund_status='REFUNDED'
  INDEX idx_goods_order2_sales_pending (sales_scanned, sales_success, order_status, refund_status, is_deleted),
  INDEX idx_goods_order2_goods_id (goods_id),
  -- close_unpaid polls two ranges: close_scanned=0 AND close_success=0 AND (cancel_requested_at IS NOT NULL
  -- OR (cancel_requested_at IS NULL AND order_status='UNPAID' AND created_at <= the payment timeout's cutoff))
  INDEX idx_goods_order2_close_pending (close_scanned, close_success, cancel_requested_at, order_status, created_at),
  -- the reaper releases a dead process's close leases by owner (a few rows, never the whole table)
  INDEX idx_goods_order2_close_lease_owner (close_lease_owner),
  -- the ship timeout (jobs.intake.ship_timeout_hours, off by default) finds PAID orders paid before a cutoff
  INDEX idx_goods_order2_ship_due (order_status, paid_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='One goods line per order. Flags: X_scanned/X_success 0/0 pending, 1/1 done, 1/0 failed.';

CREATE TABLE IF NOT EXISTS req_order_ops (
  id               BIGINT NOT NULL AUTO_INCREMENT,
  order_id         BIGINT NOT NULL COMMENT 'goods_order2.id',
  op_type          VARCHAR(32) NOT NULL COMMENT 'MERCHANT_CANCEL|USER_CANCEL|SHIP_TIMEOUT_CANCEL (the ship timeout''s own)',
  operator         VARCHAR(64) NULL,
  reason           VARCHAR(255) NULL,
  quantity         INT NULL COMMENT 'units to cancel; NULL: every unit not yet cancelled (the whole order)',
  scanned          TINYINT NOT NULL DEFAULT 0 COMMENT 'intake: 0 pending, 1 handled (see success and result_code)',
  success          TINYINT NOT NULL DEFAULT 0 COMMENT 'intake: 1 accepted (result_code OK); 0 with scanned=1 rejected or failed',
  result_code      VARCHAR(32) NULL COMMENT 'OK or a stable rejection code',
  result_msg       VARCHAR(255) NULL COMMENT 'what happened, for the merchant',
  scanned_at       DATETIME(3) NULL,
  attempts         INT NOT NULL DEFAULT 0 COMMENT 'intake: failed tries so far',
  next_attempt_at  DATETIME(3) NULL COMMENT 'intake: not retried before this time (UTC)',
  last_error       VARCHAR(255) NULL COMMENT 'intake: why the last try failed',
  created_at       DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'row inserted (UTC)',
  updated_at       DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3) COMMENT 'row last changed (UTC)',
  CONSTRAINT pk_req_order_ops PRIMARY KEY (id),
  -- intake polls: scanned=0 AND success=0 ORDER BY id
  INDEX idx_req_order_ops_pending (scanned, success, id),
  INDEX idx_req_order_ops_order_id (order_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='Merchants'' requests; their tools insert order_id, op_type, operator, reason only.';

CREATE TABLE IF NOT EXISTS refund_order (
  id                BIGINT NOT NULL AUTO_INCREMENT,
  order_id          BIGINT NOT NULL COMMENT 'goods_order2.id',
  req_id            BIGINT NULL COMMENT 'req_order_ops.id that caused it',
  refund_seq        INT NOT NULL DEFAULT 1 COMMENT '1 for the first refund of an order',
  out_refund_no     VARCHAR(64) NOT NULL COMMENT 'our refund number, [0-9A-Za-z_-]',
  out_trade_no      VARCHAR(32) NOT NULL COMMENT 'goods_order2.order_no',
  transaction_id    VARCHAR(32) NULL,
  refund_amount     INT UNSIGNED NOT NULL COMMENT 'fen',
  total_amount      INT UNSIGNED NOT NULL COMMENT 'fen paid',
  reason            VARCHAR(80) NULL,
  submit_scanned    TINYINT NOT NULL DEFAULT 0 COMMENT 'submit_refund: 0 pending, 1 finished (see submit_success)',
  submit_success    TINYINT NOT NULL DEFAULT 0 COMMENT 'submit_refund: 1 WeChat accepted the refund; 0 with submit_scanned=1 rejected',
  wx_refund_id      VARCHAR(64) NULL COMMENT 'WeChat''s refund_id',
  wx_status         VARCHAR(16) NULL COMMENT 'PROCESSING|SUCCESS|CLOSED|ABNORMAL',
  progress_scanned  TINYINT NOT NULL DEFAULT 0 COMMENT 'poll_refund: 1 once WeChat said SUCCESS or CLOSED',
  progress_success  TINYINT NOT NULL DEFAULT 0 COMMENT 'poll_refund: 1 SUCCESS (money returned), 0 with progress_scanned=1 CLOSED',
  sync_scanned      TINYINT NOT NULL DEFAULT 0 COMMENT 'sync_result: 1 once the result was written to goods_order2',
  sync_success      TINYINT NOT NULL DEFAULT 0 COMMENT 'sync_result: 1 written exactly once; 0 with sync_scanned=1 failed',
  attempts          INT NOT NULL DEFAULT 0 COMMENT 'failed tries of the current stage',
  next_attempt_at   DATETIME(3) NULL COMMENT 'current stage: not tried or polled before this time (UTC)',
  last_error        VARCHAR(255) NULL COMMENT 'why the last try failed, CODE: message',
  lease_owner       VARCHAR(64) NULL COMMENT 'daemon calling WeChat for this row now',
  lease_until       DATETIME(3) NULL COMMENT 'lease expiry (UTC); then others may take over',
  submit_sent       TINYINT NOT NULL DEFAULT 0 COMMENT 'submit_refund: 1 once an apply call may have reached WeChat; a later refusal is then checked by a query',
  -- backfill refund_order.submit_sent: UPDATE refund_order SET submit_sent = 1 WHERE submit_scanned = 0 AND attempts > 0
  submitted_at      DATETIME(3) NULL COMMENT 'when WeChat accepted the refund',
  success_time      DATETIME(3) NULL COMMENT 'WeChat''s success_time (UTC)',
  channel           VARCHAR(16) NOT NULL DEFAULT 'wechat' COMMENT 'the payment channel the refund is sent through: the order''s',
  quantity          INT UNSIGNED NULL COMMENT 'units it pays back; NULL: a refund from before schema 8 (the whole order)',
  part              TINYINT NOT NULL DEFAULT 0 COMMENT '1: the refund of a partial cancel, the order goes on; 0: the refund of the order''s cancel',
  applied_at        DATETIME(3) NULL COMMENT 'submit_refund: when it was last leased to go out to the payment channel',
  goods_scanned     TINYINT NOT NULL DEFAULT 0 COMMENT 'part_goods: 0 pending, 1 finished (see goods_success); a partial cancel''s refund only',
  goods_success     TINYINT NOT NULL DEFAULT 0 COMMENT 'part_goods: 1 its units back in stock and off sales exactly once; 0 with goods_scanned=1 failed',
  goods_attempts    INT NOT NULL DEFAULT 0 COMMENT 'part_goods: failed tries so far',
  goods_next_attempt_at DATETIME(3) NULL COMMENT 'part_goods: not retried before this time (UTC)',
  goods_last_error  VARCHAR(255) NULL COMMENT 'part_goods: why the last try failed',
  created_at        DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'row inserted (UTC)',
  updated_at        DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3) COMMENT 'row last changed (UTC)',
  CONSTRAINT pk_refund_order PRIMARY KEY (id),
  CONSTRAINT uk_refund_order_out_refund_no UNIQUE KEY (out_refund_no),
  -- an order's refunds are numbered 1, 2, ... under its row lock (intake, reissue): never two of one number
  CONSTRAINT uk_refund_order_order_seq UNIQUE KEY (order_id, refund_seq),
  -- submit_refund polls: submit_scanned=0 AND submit_success=0 AND next_attempt_at<=now
  INDEX idx_refund_order_submit_pending (submit_scanned, submit_success, next_attempt_at),
  -- poll_refund polls: submit_success=1 AND progress_scanned=0 AND progress_success=0 AND next_attempt_at<=now
  INDEX idx_refund_order_poll_pending (submit_success, progress_scanned, progress_success, next_attempt_at),
  -- sync_result polls: progress_scanned=1 AND sync_scanned=0 AND sync_success=0
  INDEX idx_refund_order_sync_pending (progress_scanned, sync_scanned, sync_success),
  -- the reaper releases a dead process's leases by owner
  INDEX idx_refund_order_lease_owner (lease_owner),
  -- reconcile finds the refunds WeChat accepted on a day
  INDEX idx_refund_order_submitted_at (submitted_at),
  -- part_goods polls: part=1 AND sync_success=1 AND goods_scanned=0 AND goods_success=0
  INDEX idx_refund_order_goods_pending (part, sync_success, goods_scanned, goods_success),
  CONSTRAINT ck_refund_order_refund_within_total CHECK (refund_amount <= total_amount)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='One row per refund sent to WeChat Pay; out_refund_no is fixed before the first call.';

CREATE TABLE IF NOT EXISTS goods_order2_oplog (
  id          BIGINT NOT NULL AUTO_INCREMENT,
  order_id    BIGINT NOT NULL COMMENT 'goods_order2.id',
  event       VARCHAR(32) NOT NULL COMMENT 'CANCELLED|REFUND_SUBMITTED|REFUND_SUCCEEDED|REFUND_FAILED|STOCK_RESTORED|SALES_DECREMENTED|PAYMENT_FOUND|PAYMENT_CLOSED|REFUND_REISSUED|ABNORMAL_REFUND_APPLIED|ORPHAN_PAYMENT_REFUND; a refund after the first adds #N (REFUND_SUBMITTED#2)',
  detail      VARCHAR(255) NULL,
  created_at  DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'row inserted (UTC)',
  updated_at  DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3) COMMENT 'row last changed (UTC)',
  CONSTRAINT pk_goods_order2_oplog PRIMARY KEY (id),
  -- each event at most once per order, enforced by the database itself
  CONSTRAINT uk_goods_order2_oplog_order_event UNIQUE KEY (order_id, event)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='What the scanner did to each order, one row per event.';

CREATE TABLE IF NOT EXISTS cancel_scanner_process (
  id            BIGINT NOT NULL AUTO_INCREMENT,
  owner         VARCHAR(64) NOT NULL COMMENT 'the lease_owner this process writes',
  hostname      VARCHAR(64) NOT NULL,
  pid           INT NOT NULL,
  started_at    DATETIME(3) NOT NULL COMMENT 'registered at (database time, UTC)',
  heartbeat_at  DATETIME(3) NOT NULL COMMENT 'last heartbeat (database time, UTC); silent past takeover_seconds = dead',
  report        VARCHAR(4000) NULL COMMENT 'its stages (up, or down since when and why) and rows finished since it started, JSON; read by status',
  pace_group    VARCHAR(64) NULL COMMENT 'the merchant (mchid) whose WeChat QPS it shares with the other live processes of it; NULL: calls nothing paced',
  pace_limits   VARCHAR(255) NULL COMMENT 'the per-merchant QPS it was configured with, endpoint=qps;...: processes of one merchant pace at the strictest',
  created_at    DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'row inserted (UTC)',
  updated_at    DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3) COMMENT 'row last changed (UTC)',
  CONSTRAINT pk_cancel_scanner_process PRIMARY KEY (id),
  CONSTRAINT uk_cancel_scanner_process_owner UNIQUE KEY (owner),
  INDEX idx_cancel_scanner_process_heartbeat_at (heartbeat_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='Running cancel-scanner processes and their heartbeats (database time); leases of a silent one are released.';

CREATE TABLE IF NOT EXISTS cancel_scanner_schema (
  version     INT NOT NULL COMMENT 'a schema version this database reached; the highest is its version',
  applied_by  VARCHAR(64) NOT NULL COMMENT 'what brought it there: schema.sql, initdb or migrate, and the cancel-scanner version',
  applied_at  DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'when (UTC)',
  CONSTRAINT pk_cancel_scanner_schema PRIMARY KEY (version)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='Schema versions; the daemon refuses to start on a database behind or ahead of its own.';

-- Reconciliation against WeChat Pay's daily bill (cancel-scanner reconcile, and the daemon's daily job).
CREATE TABLE IF NOT EXISTS reconcile_diff (
  id             BIGINT NOT NULL AUTO_INCREMENT,
  bill_date      DATE NOT NULL COMMENT 'the bill''s day (Beijing time)',
  kind           VARCHAR(32) NOT NULL COMMENT 'MISSING_HERE|MISSING_AT_WECHAT|AMOUNT_DIFFERS|STATUS_DIFFERS|ORPHAN_PAYMENT|DUPLICATE_LINE|UNBOOKED_PAYMENT',
  out_trade_no   VARCHAR(32) NOT NULL COMMENT 'goods_order2.order_no',
  out_refund_no  VARCHAR(64) NULL COMMENT 'refund_order.out_refund_no, for a refund',
  ours_fen       BIGINT NULL COMMENT 'our amount (fen)',
  theirs_fen     BIGINT NULL COMMENT 'the bill''s amount (fen)',
  ours_status    VARCHAR(16) NULL,
  theirs_status  VARCHAR(16) NULL,
  detail         VARCHAR(255) NOT NULL COMMENT 'what differs, for a person',
  created_at     DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'row inserted (UTC)',
  CONSTRAINT pk_reconcile_diff PRIMARY KEY (id),
  INDEX idx_reconcile_diff_bill_date (bill_date, kind)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='One row per difference between WeChat Pay''s daily bill and our tables; a day reconciled again replaces its rows.';

CREATE TABLE IF NOT EXISTS reconcile_run (
  bill_date    DATE NOT NULL COMMENT 'the bill''s day (Beijing time)',
  state        VARCHAR(16) NOT NULL COMMENT 'CLEAN|DIFFERS|NO_BILL|WAITING|FAILED',
  bill_rows    INT NOT NULL DEFAULT 0 COMMENT 'detail rows in the bill',
  diffs        INT NOT NULL DEFAULT 0 COMMENT 'rows in reconcile_diff for the day',
  attempts     INT NOT NULL DEFAULT 0,
  last_error   VARCHAR(255) NULL COMMENT 'why the last try failed (STATEMENT_CREATING, a bad SHA1, ...)',
  finished_at  DATETIME(3) NULL COMMENT 'when the comparison was written (UTC)',
  created_at   DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'row inserted (UTC)',
  updated_at   DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3) COMMENT 'row last changed (UTC)',
  CONSTRAINT pk_reconcile_run PRIMARY KEY (bill_date)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='One row per reconciled day: how the last reconciliation of that day ended.';

-- Every operator action (issue 28): who ran which command with what, when, and what it changed.
CREATE TABLE IF NOT EXISTS operator_action (
  id           BIGINT NOT NULL AUTO_INCREMENT,
  command      VARCHAR(32) NOT NULL COMMENT 'requeue|reissue|abnormal-refund|reconcile|prune|migrate',
  arguments    VARCHAR(1000) NULL COMMENT 'its arguments, name=value, secrets and bank details never written',
  os_user      VARCHAR(64) NOT NULL COMMENT 'the operating system user who ran it',
  host         VARCHAR(64) NOT NULL COMMENT 'the host it ran on',
  operator     VARCHAR(64) NULL COMMENT '--operator NAME, when given',
  started_at   DATETIME(3) NOT NULL COMMENT 'when it started (UTC)',
  ended_at     DATETIME(3) NULL COMMENT 'when it ended (UTC); NULL: still running, or killed',
  outcome      VARCHAR(16) NULL COMMENT 'ok|refused|failed|interrupted (exit 0, 2, other)',
  exit_code    INT NULL,
  changed      VARCHAR(1000) NULL COMMENT 'what it changed, in a line',
  created_at   DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'row inserted (UTC)',
  updated_at   DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3) COMMENT 'row last changed (UTC)',
  CONSTRAINT pk_operator_action PRIMARY KEY (id),
  INDEX idx_operator_action_started_at (started_at),
  INDEX idx_operator_action_command (command, started_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='Every operator action: the command, its arguments (no secret), who, where, when, and what it changed.';

-- What a payment channel did for a row whose write-back here failed (a shop trigger refused it, a
-- constraint): kept on a table of ours, so it is never lost, until the row's stage records it.
CREATE TABLE IF NOT EXISTS channel_fact (
  id             BIGINT NOT NULL AUTO_INCREMENT,
  stage          VARCHAR(32) NOT NULL COMMENT 'the gateway stage that called',
  row_id         BIGINT NOT NULL COMMENT 'the id of that stage''s row',
  order_id       BIGINT NULL COMMENT 'goods_order2.id',
  number         VARCHAR(64) NOT NULL COMMENT 'out_trade_no or out_refund_no',
  fact           VARCHAR(32) NOT NULL COMMENT 'PAYMENT_CLOSED|PAYMENT_PAID|REFUND_ACCEPTED|REFUND_SUCCESS|REFUND_CLOSED',
  detail         VARCHAR(255) NULL COMMENT 'the channel''s ids and amounts, for a person',
  reason         VARCHAR(255) NOT NULL COMMENT 'why the write here failed, last time',
  times_seen     INT NOT NULL DEFAULT 1,
  first_seen_at  DATETIME(3) NOT NULL COMMENT 'database time, UTC',
  last_seen_at   DATETIME(3) NOT NULL COMMENT 'database time, UTC',
  resolved_at    DATETIME(3) NULL COMMENT 'when the stage recorded it (UTC); NULL: still open',
  CONSTRAINT pk_channel_fact PRIMARY KEY (id),
  CONSTRAINT uk_channel_fact_stage_row UNIQUE KEY (stage, row_id),
  INDEX idx_channel_fact_open (resolved_at, last_seen_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='What a payment channel did for a row whose write-back here failed (a shop trigger, a constraint): kept on a table of ours until the row''s stage records it.';

-- Finished rows moved out of the live tables by `cancel-scanner prune`: the same columns, and when.
CREATE TABLE IF NOT EXISTS req_order_ops_archive (
  id               BIGINT NOT NULL,
  order_id         BIGINT NOT NULL,
  op_type          VARCHAR(32) NOT NULL,
  operator         VARCHAR(64) NULL,
  reason           VARCHAR(255) NULL,
  quantity         INT NULL,
  scanned          TINYINT NOT NULL,
  success          TINYINT NOT NULL,
  result_code      VARCHAR(32) NULL,
  result_msg       VARCHAR(255) NULL,
  scanned_at       DATETIME(3) NULL,
  attempts         INT NOT NULL,
  next_attempt_at  DATETIME(3) NULL,
  last_error       VARCHAR(255) NULL,
  created_at       DATETIME(3) NOT NULL,
  updated_at       DATETIME(3) NOT NULL,
  archived_at      DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'moved here (UTC)',
  CONSTRAINT pk_req_order_ops_archive PRIMARY KEY (id),
  INDEX idx_req_order_ops_archive_order_id (order_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='req_order_ops rows pruned from the live table: finished, older than prune''s cutoff.';

CREATE TABLE IF NOT EXISTS refund_order_archive (
  id                BIGINT NOT NULL,
  order_id          BIGINT NOT NULL,
  req_id            BIGINT NULL,
  refund_seq        INT NOT NULL,
  out_refund_no     VARCHAR(64) NOT NULL,
  out_trade_no      VARCHAR(32) NOT NULL,
  transaction_id    VARCHAR(32) NULL,
  refund_amount     INT UNSIGNED NOT NULL,
  total_amount      INT UNSIGNED NOT NULL,
  reason            VARCHAR(80) NULL,
  submit_scanned    TINYINT NOT NULL,
  submit_success    TINYINT NOT NULL,
  wx_refund_id      VARCHAR(64) NULL,
  wx_status         VARCHAR(16) NULL,
  progress_scanned  TINYINT NOT NULL,
  progress_success  TINYINT NOT NULL,
  sync_scanned      TINYINT NOT NULL,
  sync_success      TINYINT NOT NULL,
  attempts          INT NOT NULL,
  next_attempt_at   DATETIME(3) NULL,
  last_error        VARCHAR(255) NULL,
  lease_owner       VARCHAR(64) NULL,
  lease_until       DATETIME(3) NULL,
  submit_sent       TINYINT NOT NULL,
  submitted_at      DATETIME(3) NULL,
  success_time      DATETIME(3) NULL,
  channel           VARCHAR(16) NOT NULL DEFAULT 'wechat',
  quantity          INT UNSIGNED NULL,
  part              TINYINT NOT NULL DEFAULT 0,
  applied_at        DATETIME(3) NULL,
  goods_scanned     TINYINT NOT NULL DEFAULT 0,
  goods_success     TINYINT NOT NULL DEFAULT 0,
  goods_attempts    INT NOT NULL DEFAULT 0,
  goods_next_attempt_at DATETIME(3) NULL,
  goods_last_error  VARCHAR(255) NULL,
  created_at        DATETIME(3) NOT NULL,
  updated_at        DATETIME(3) NOT NULL,
  archived_at       DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'moved here (UTC)',
  CONSTRAINT pk_refund_order_archive PRIMARY KEY (id),
  CONSTRAINT uk_refund_order_archive_out_refund_no UNIQUE KEY (out_refund_no),
  INDEX idx_refund_order_archive_order_id (order_id),
  INDEX idx_refund_order_archive_submitted_at (submitted_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='refund_order rows pruned from the live table: refunded and synced, older than prune''s cutoff.';

CREATE TABLE IF NOT EXISTS goods_order2_oplog_archive (
  id          BIGINT NOT NULL,
  order_id    BIGINT NOT NULL,
  event       VARCHAR(32) NOT NULL,
  detail      VARCHAR(255) NULL,
  created_at  DATETIME(3) NOT NULL,
  updated_at  DATETIME(3) NOT NULL,
  archived_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) COMMENT 'moved here (UTC)',
  CONSTRAINT pk_goods_order2_oplog_archive PRIMARY KEY (id),
  CONSTRAINT uk_goods_order2_oplog_archive_order_event UNIQUE KEY (order_id, event)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci
  COMMENT='goods_order2_oplog rows pruned from the live table, older than prune''s cutoff.';

-- For DBAs: every row that finished with a permanent failure (X_scanned=1, X_success=0).
CREATE OR REPLACE VIEW v_cancel_scanner_failed AS
  SELECT 'intake' AS stage, 'req_order_ops' AS table_name, id AS row_id, order_id,
         CONCAT_WS(': ', result_code, result_msg) AS reason, updated_at
    FROM req_order_ops WHERE scanned = 1 AND success = 0
  UNION ALL
  SELECT 'submit_refund', 'refund_order', id, order_id, last_error, updated_at
    FROM refund_order WHERE submit_scanned = 1 AND submit_success = 0
  UNION ALL
  -- sync_result clears last_error when it writes a CLOSED refund to its order: the reason is then wx_status
  SELECT 'poll_refund', 'refund_order', id, order_id,
         COALESCE(last_error, CASE WHEN wx_status = 'CLOSED'
                                   THEN CONCAT('REFUND_CLOSED: WeChat closed refund ', out_refund_no, '; no money moved') END),
         updated_at
    FROM refund_order WHERE progress_scanned = 1 AND progress_success = 0
     AND (last_error IS NULL OR LEFT(last_error, 8) <> 'REISSUED')  -- a reissued CLOSED refund needs nobody
  UNION ALL
  SELECT 'sync_result', 'refund_order', id, order_id, last_error, updated_at
    FROM refund_order WHERE sync_scanned = 1 AND sync_success = 0
  UNION ALL
  SELECT 'restore_stock', 'goods_order2', id, id, stock_last_error, updated_at
    FROM goods_order2 WHERE stock_scanned = 1 AND stock_success = 0
  UNION ALL
  SELECT 'decrement_sales', 'goods_order2', id, id, sales_last_error, updated_at
    FROM goods_order2 WHERE sales_scanned = 1 AND sales_success = 0
  UNION ALL
  SELECT 'close_unpaid', 'goods_order2', id, id, close_last_error, updated_at
    FROM goods_order2 WHERE close_scanned = 1 AND close_success = 0
  UNION ALL
  SELECT 'part_goods', 'refund_order', id, order_id, goods_last_error, updated_at
    FROM refund_order WHERE goods_scanned = 1 AND goods_success = 0;

INSERT IGNORE INTO cancel_scanner_schema (version, applied_by) VALUES (9, 'schema.sql');
