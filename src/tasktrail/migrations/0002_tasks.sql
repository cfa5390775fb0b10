-- The read models' tables were made here until migration 0014. Since then each
-- read model's module (projections/tasks.py, projections/stats.py) is the one
-- definition of its tables: a version's tables live in a schema of their own
-- (rm_tasks_v1, ...) and `tasktrail serve` builds a version that has no tables
-- from the log (see projections/versions.py). A database migrated before
-- 0014 has the tables this file used to make; 0014 moves them into rm_tasks_v1
-- and rm_stats_v1, where they are exactly what the modules make.
SELECT 1;
