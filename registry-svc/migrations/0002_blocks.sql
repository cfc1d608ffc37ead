-- Interpose registry on PostgreSQL, schema version 2: the history in blocks.
--
-- A commit's packets are framed once (the sled store's history frame format); each
-- connection's packets in it, a block, is one row of `blocks`, cut into pieces of under a
-- page when it is larger, instead of a row and two index entries per packet. The segments
-- stay list partitions, now of `blocks`, dropped whole at the budget. The registry moves
-- the rows of version 1's `packets` into blocks when it applies this version, then drops
-- `packets`.
CREATE TABLE blocks (
    seg bigint NOT NULL,
    batch bigint NOT NULL,              -- the arrival log's batch (see `arrivals`)
    conn_id bigint NOT NULL,
    first_seq bigint NOT NULL,          -- the block's lowest and highest seq
    last_seq bigint NOT NULL,
    part integer NOT NULL,              -- this piece, 0 .. parts - 1
    parts integer NOT NULL,
    packets integer NOT NULL,           -- packets in the block
    bytes bigint NOT NULL,              -- their payload bytes (data and original)
    ts_min bigint,                      -- capture times, ns since the epoch (NULL: none)
    ts_max bigint,
    untimed boolean NOT NULL,           -- some packets have no capture time
    body bytea NOT NULL                 -- this piece of the block's packet records
) PARTITION BY LIST (seg);
-- Pieces fit in a page: stored in the row as they are, no compression, no TOAST.
ALTER TABLE blocks ALTER COLUMN body SET STORAGE PLAIN;
CREATE INDEX blocks_key ON blocks (conn_id, first_seq, part);
-- The arrival log reads blocks by batch; batches grow with time, so a BRIN index serves it.
CREATE INDEX blocks_batch ON blocks USING brin (batch) WITH (pages_per_range = 16);
