-- An Idempotency-Key of POST /tasks/batch covers the whole batch: a repeat
-- returns every task the first request created, in its order. Such a key keeps
-- them in task_ids and leaves task_id (a single create's task) NULL. The
-- fingerprint says which kind of request took the key (a batch's is taken over
-- a prefix no single create's body can have), so a key used for one kind and
-- then for the other is a different body, whichever column an older release reads.
ALTER TABLE idempotency_keys ALTER COLUMN task_id DROP NOT NULL;
ALTER TABLE idempotency_keys ADD COLUMN task_ids uuid[];
ALTER TABLE idempotency_keys
    ADD CONSTRAINT idempotency_keys_names_tasks CHECK (task_id IS NOT NULL OR task_ids IS NOT NULL);
