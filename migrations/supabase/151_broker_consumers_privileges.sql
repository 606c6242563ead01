-- supabase 151: the consumers' registry (core 150) is the workers' and
-- monitors', never users' (Supabase's anon and authenticated).

REVOKE ALL ON broker_consumers FROM anon, authenticated;
GRANT ALL ON broker_consumers TO service_role;
