-- core 107: what kinds of artifact exist is the app's business, not the
-- broker's.
--
-- The baseline (as legacy 002) let job_artifacts.kind be only 'audio', 'pdf'
-- or 'other': the words of the package app in tasks/. The library keeps the
-- column and its meaning (a label the app chooses; tasks/storage.py names
-- the kinds it stores) and drops the rule, on new databases and on those the
-- single-track runner built alike.

ALTER TABLE job_artifacts DROP CONSTRAINT job_artifacts_kind_check;
