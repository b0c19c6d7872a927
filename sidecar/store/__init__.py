"""Store adapters: the embedded in-memory default (memory.py) and PostgreSQL on asyncpg (postgres.py, with its
statements in statements.py and what each step writes in step_writer.py), the ordered queue of database steps
that feeds them (pending.py, the runtime's StepQueue port) with its local journal (journal.py), fleet mode's
shared decision state (shared_decisions.py) and socket leases with routed commands (leases.py), migrations, the
seed-schema check and SQL identifier quoting."""
