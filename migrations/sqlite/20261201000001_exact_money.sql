-- Money is kept in whole micro-dollars, so sums are exact: every cost and budget column moves
-- from dollars as REAL to micro-dollars as INTEGER, rounded to the nearest micro-dollar.
ALTER TABLE runs ADD COLUMN cost_micros INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN budget_micros INTEGER;
UPDATE runs SET cost_micros = CAST(ROUND(cost_usd * 1000000) AS INTEGER),
                budget_micros = CAST(ROUND(budget_usd * 1000000) AS INTEGER);
ALTER TABLE runs DROP COLUMN cost_usd;
ALTER TABLE runs DROP COLUMN budget_usd;

ALTER TABLE stages ADD COLUMN cost_micros INTEGER NOT NULL DEFAULT 0;
UPDATE stages SET cost_micros = CAST(ROUND(cost_usd * 1000000) AS INTEGER);
ALTER TABLE stages DROP COLUMN cost_usd;

ALTER TABLE steps ADD COLUMN cost_micros INTEGER NOT NULL DEFAULT 0;
UPDATE steps SET cost_micros = CAST(ROUND(cost_usd * 1000000) AS INTEGER);
ALTER TABLE steps DROP COLUMN cost_usd;
