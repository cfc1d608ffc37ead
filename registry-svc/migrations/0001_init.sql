-- Interpose registry on PostgreSQL, schema version 1.
--
-- Connection records, ID leases, node reports, the numbered feed of record changes that
-- every registry process on this database follows, and the proxy history in segments
-- (list partitions of `packets`) that the retention budget drops whole.

-- The order of changes: one row, updated as the last step of every transaction that
-- changes records or adds history. Its row lock makes those transactions commit in number
-- order, so a reader that sees change N (or arrival position N) sees every one before it.
CREATE TABLE counter (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq bigint NOT NULL DEFAULT 0,      -- the last record change
    pos bigint NOT NULL DEFAULT 0       -- the last arrival position
);
INSERT INTO counter DEFAULT VALUES;

-- ID leases: the next ID never given out, across every registry process.
CREATE TABLE id_lease (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    next bigint NOT NULL DEFAULT 1
);
INSERT INTO id_lease DEFAULT VALUES;

-- Connection records; a cleared one keeps its row with no body, so its ID never returns.
CREATE TABLE conns (
    id bigint PRIMARY KEY,
    active boolean NOT NULL,
    body bytea                          -- interpose.common.v1.Connection; NULL: cleared
);
CREATE INDEX conns_active ON conns (id) WHERE active;

-- The feed of record changes, in number order; trimmed after a few minutes.
CREATE TABLE changes (
    seq bigint PRIMARY KEY,
    id bigint NOT NULL,
    body bytea,                         -- the record after the change; NULL: cleared
    at timestamptz NOT NULL DEFAULT now()
);

-- Proxy nodes: their ingest session, loss report and when they last reported.
CREATE TABLE nodes (
    name text PRIMARY KEY,
    session text NOT NULL DEFAULT '',
    losses bytea,                       -- interpose.registry.v1.ProxyLosses
    seen timestamptz
);

-- History totals kept across restarts.
CREATE TABLE history_totals (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    evicted_packets bigint NOT NULL DEFAULT 0,
    evicted_bytes bigint NOT NULL DEFAULT 0,
    refused_packets bigint NOT NULL DEFAULT 0,
    refused_bytes bigint NOT NULL DEFAULT 0,
    purged_packets bigint NOT NULL DEFAULT 0,
    purged_bytes bigint NOT NULL DEFAULT 0,
    removed_pos bigint NOT NULL DEFAULT 0   -- positions up to here may have lost packets
);
INSERT INTO history_totals DEFAULT VALUES;

-- The arrival log: each transaction that stored fresh packets or closed records takes the
-- next position; its packets carry its batch number.
CREATE SEQUENCE batches;
CREATE TABLE arrivals (
    pos bigint PRIMARY KEY,
    batch bigint NOT NULL,
    closed bytea[] NOT NULL             -- records closed at this position
);
CREATE INDEX arrivals_batch ON arrivals (batch);

-- History segments: one list partition of `packets` each, dropped whole at the budget.
CREATE TABLE segments (
    seg bigint PRIMARY KEY,
    packets bigint NOT NULL DEFAULT 0,
    bytes bigint NOT NULL DEFAULT 0,
    last_pos bigint NOT NULL DEFAULT 0
);
CREATE TABLE packets (
    seg bigint NOT NULL,
    conn_id bigint NOT NULL,
    seq bigint NOT NULL,
    batch bigint NOT NULL,
    ts bigint,                          -- capture time, ns since the epoch
    bytes integer NOT NULL,             -- payload bytes (data and original)
    body bytea NOT NULL                 -- interpose.common.v1.Packet
) PARTITION BY LIST (seg);
-- No compression attempt per value: ingest speed over disk (the budget counts payload bytes).
ALTER TABLE packets ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE INDEX packets_key ON packets (conn_id, seq);
-- The arrival log reads packets by batch; batches grow with time, so a BRIN index (a few
-- bytes per block range) serves it without a B-tree insert per packet.
CREATE INDEX packets_batch ON packets USING brin (batch) WITH (pages_per_range = 16);
CREATE TABLE packets_1 PARTITION OF packets FOR VALUES IN (1);
INSERT INTO segments (seg) VALUES (1);
