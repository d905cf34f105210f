-- The current schema, claimed with the service's own CLAIM statement (the
-- fair share over lanes, the top-up, the serialization-key check and the
-- slot subscripts) instead of current.claim.sql's one-lane claim: what the
-- fair-share shape costs over the plain one. From WITH to RETURNING it is
-- src/store/invoices.rs's CLAIM with its parameters named and without its
-- comments (pgbench would read `:name` there as a variable too), and a unit
-- test there holds it to that. pgbench -M prepared binds the \gset
-- variables as parameters, as sqlx binds the service's; one lane, no
-- cursor, 100 slots for one holder.
SELECT '{worker-' || :client_id || '}' AS holders, 100 AS n, 30000000 AS lease,
       '{default}' AS queues, '{0}' AS priorities, '{NULL}' AS after_ats, '{NULL}' AS after_ids,
       '{default}' AS share_queues, '{100}' AS quotas, array_fill(1, ARRAY[100])::text AS slots
\gset
WITH lane AS (
        SELECT lane_queue, lane_priority, lane_order,
               coalesce(after_at, '-infinity') AS after_at, coalesce(after_id, 0) AS after_id
        FROM unnest(:queues::text[], :priorities::smallint[], :after_ats::timestamptz[], :after_ids::bigint[])
             WITH ORDINALITY AS l(lane_queue, lane_priority, after_at, after_id, lane_order)
    ),
    fair AS (
        SELECT picked.*
        FROM unnest(:share_queues::text[], :quotas::integer[]) AS share(share_queue, share_quota)
        CROSS JOIN LATERAL (
            SELECT taken.*
            FROM (SELECT * FROM lane WHERE lane_queue = share.share_queue
                  ORDER BY lane_order) l
            CROSS JOIN LATERAL (
                SELECT id AS pick_id, serialization_key AS pick_key,
                       priority AS pick_priority, available_at AS pick_available_at
                FROM invoices
                WHERE queue = l.lane_queue AND priority = l.lane_priority
                  AND (available_at, id) >= (l.after_at, l.after_id) AND state = 'pending' AND available_at <= now()
         AND (serialization_key IS NULL OR (
              NOT EXISTS (SELECT 1 FROM invoices busy
                          WHERE busy.serialization_key = invoices.serialization_key
                            AND busy.state = 'leased')
              AND pg_try_advisory_xact_lock(1651663669, hashtext(serialization_key))))
                ORDER BY available_at, id
                LIMIT share.share_quota
                FOR UPDATE SKIP LOCKED
            ) taken
            LIMIT share.share_quota
        ) picked
    ),
    topped_up AS (
        SELECT taken.*
        FROM (SELECT * FROM lane ORDER BY lane_order) l
        CROSS JOIN LATERAL (
            SELECT id AS pick_id, serialization_key AS pick_key,
                   priority AS pick_priority, available_at AS pick_available_at
            FROM invoices
            WHERE queue = l.lane_queue AND priority = l.lane_priority
              AND (available_at, id) >= (l.after_at, l.after_id) AND state = 'pending' AND available_at <= now()
         AND (serialization_key IS NULL OR (
              NOT EXISTS (SELECT 1 FROM invoices busy
                          WHERE busy.serialization_key = invoices.serialization_key
                            AND busy.state = 'leased')
              AND pg_try_advisory_xact_lock(1651663669, hashtext(serialization_key))))
              AND id NOT IN (SELECT pick_id FROM fair)
            ORDER BY available_at, id
            LIMIT greatest(0, :n - (SELECT count(*) FROM fair))
            FOR UPDATE SKIP LOCKED
        ) taken
        LIMIT greatest(0, :n - (SELECT count(*) FROM fair))
    ),
    picked AS (
        SELECT pick_id,
               row_number() OVER (ORDER BY pick_priority, pick_available_at, pick_id) AS slot
        FROM (
            SELECT pick_id, pick_key, pick_priority, pick_available_at,
                   row_number() OVER (PARTITION BY pick_key
                                      ORDER BY pick_priority, pick_available_at, pick_id) AS nth
            FROM (SELECT * FROM fair UNION ALL SELECT * FROM topped_up) AS candidates
        ) ranked
        WHERE pick_key IS NULL OR nth = 1
    ),
    assigned AS (
        SELECT pick_id, slot, (:holders::text[])[(:slots::integer[])[slot]] AS holder
        FROM picked
        WHERE slot <= cardinality(:slots::integer[])
    ),
    claimed AS (
        UPDATE invoices SET
            state = 'leased',
            attempts = attempts + 1,
            lease_epoch = lease_epoch + 1,
            lease_nonce = (random() * 9007199254740991)::bigint,
            leased_by = holder,
            leased_at = now(),
            lease_expires_at = now() + :lease * interval '1 microsecond',
            lease_released = false,
            updated_at = now()
        FROM assigned
        WHERE id = pick_id
        RETURNING *
    ),
    logged AS (
        INSERT INTO invoice_events (invoice_id, kind, worker_id, attempt, lease_epoch, lease_nonce)
        SELECT id, 'claimed', leased_by, attempts, lease_epoch, lease_nonce FROM claimed
    )
SELECT coalesce(array_agg(id), '{}') AS ids, coalesce(array_agg(lease_epoch), '{}') AS eps,
       coalesce(array_agg(lease_nonce), '{}') AS nonces,
       max(length(metadata::text) + length(external_id) + length(customer_id)) AS width
FROM claimed
\gset
