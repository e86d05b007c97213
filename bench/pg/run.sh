#!/usr/bin/env bash
# PostgreSQL 15 baseline for engage's query benchmark.
#
# Usage (as root, Debian 12):  bench/pg/run.sh CSV_PATH
#
# CSV_PATH: header line, then event_id,user_id,name,occurred_at,attributes (occurred_at RFC 3339
# UTC, attributes a JSON object, CSV-quoted), as written by the engage side.
#
# What it does: installs postgresql-15 from Debian's packages if missing; starts a throwaway
# cluster (initdb in a temp dir, run as the postgres user, 127.0.0.1 on a free port, Unix socket
# in the temp dir); creates the table (schema.sql), COPYs the CSV in, builds the indexes
# (indexes.sql, see the reasoning there), VACUUM ANALYZE; then runs every queries/*.sql
# WARMUP times untimed and RUNS times timed. The cluster is stopped and the temp dir removed on
# exit, whatever the exit.
#
# Output, on stdout, one JSON object per line:
#   {"engine": ..., "timing": ...}                         what was measured and how
#   {"load": {...}}                                        COPY / index / VACUUM ANALYZE times
#   {"table": {...}}                                       row count and on-disk sizes
#   {"query": "q1", "variant": "general", "first_ms": .., "median_ms": .., "min_ms": ..,
#    "rows": .., "total": .., "runs_ms": [..]}                 with the indexes of indexes.sql
#   {"covering": {...}}                                    covering.sql's build time, sizes
#   {"query": "q1", "variant": "covering", ...}            the same with covering.sql's indexes
# "rows" is the rows the statement returned (the first page: <= 100 user_ids; 24 buckets for
# stats24h), "total" the number of matching users (for stats24h: products sold in the 24 hours).
#
# Timing: client-observed wall time of each statement, from psql's \timing, over the local Unix
# socket, simple query protocol (so each run parses, plans, executes and ships the first page,
# like a client sending an ad-hoc query). psql's own formatting of the <= 100 result rows is
# inside that time; the output is sent to /dev/null.
#
# Environment (all optional): AS_OF (default 2026-11-01T00:00:00Z), WARMUP (2), RUNS (7),
# PG_SHARED_BUFFERS (1GB), KEEP_TMP=1 (leave the temp dir and cluster log behind, cluster stopped).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PGBIN=/usr/lib/postgresql/15/bin
AS_OF=${AS_OF:-2026-11-01T00:00:00Z}
WARMUP=${WARMUP:-2}
RUNS=${RUNS:-7}
SHARED_BUFFERS=${PG_SHARED_BUFFERS:-1GB}
QUERIES=(q1 q2 q3 q4 q5 stats24h)

die() { echo "bench/pg/run.sh: $*" >&2; exit 1; }

[[ $# -eq 1 ]] || die "usage: $0 CSV_PATH"
[[ -r $1 && -f $1 ]] || die "cannot read CSV file: $1"
CSV=$(realpath "$1")
[[ $EUID -eq 0 ]] || die "run as root (it installs packages and switches to the postgres user)"
[[ $WARMUP =~ ^[0-9]+$ && $RUNS =~ ^[1-9][0-9]*$ ]] || die "WARMUP/RUNS must be integers, RUNS >= 1"

# --- 1. PostgreSQL 15 -------------------------------------------------------------------------
if [[ ! -x $PGBIN/initdb || ! -x $PGBIN/pg_ctl || ! -x $PGBIN/psql ]]; then
    export DEBIAN_FRONTEND=noninteractive
    # Note: the package also creates and starts Debian's default cluster (15/main on 5432);
    # it sits idle during the benchmark and is not touched by this script.
    if ! { apt-get update -qq && apt-get install -y -qq postgresql-15; } >/tmp/engage-pg-apt.log 2>&1; then
        tail -n 30 /tmp/engage-pg-apt.log >&2
        die "apt-get install postgresql-15 failed (log: /tmp/engage-pg-apt.log)"
    fi
fi
id postgres >/dev/null 2>&1 || die "no postgres user (the postgresql-15 package creates it)"

# --- 2. Throwaway cluster ---------------------------------------------------------------------
WORK=$(mktemp -d /tmp/engage-pgbench.XXXXXX)
chown postgres:postgres "$WORK"
DATA=$WORK/data
LOG=$WORK/server.log
STARTED=0

as_pg() { runuser -u postgres -- "$@"; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $rc -ne 0 ]]; then
        echo "bench/pg/run.sh: failed (exit $rc)" >&2
        local f=$LOG
        [[ $STARTED -eq 1 || ! -s $WORK/initdb.log ]] || f=$WORK/initdb.log
        if [[ -s $f ]]; then echo "--- tail of $(basename "$f")" >&2; tail -n 20 "$f" >&2; fi
    fi
    if [[ $STARTED -eq 1 ]]; then
        as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w -t 30 stop >/dev/null 2>&1 \
            || as_pg "$PGBIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [[ ${KEEP_TMP:-0} == 1 ]]; then
        echo "bench/pg/run.sh: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A TCP port on 127.0.0.1 that nothing listens on (connection refused). pg_ctl start fails
# cleanly if another process grabs it in between, and then we try another one.
free_port() {
    local p
    for p in $(shuf -i 20000-60999 -n 64); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
    done
    return 1
}

as_pg "$PGBIN/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --no-locale -N \
    >"$WORK/initdb.log" 2>&1

# Server settings. shared_buffers holds the whole table and its indexes (~0.3 GB for 1M rows), so
# timed runs read no disk. The rest is what a competent user sets on a machine with RAM to spare;
# planner cost constants keep their defaults (no tuning towards these queries), and fsync and
# synchronous_commit keep their (durable) defaults.
#  - work_mem 64MB: per-user aggregates over ~100k users hash or sort in memory, never spill.
#  - maintenance_work_mem 512MB, max_wal_size 4GB: the usual bulk-load settings (index builds
#    sort in memory; no forced checkpoints during COPY).
#  - jit off: at 1M rows no plan here costs more than jit_above_cost, so it changes nothing; it is
#    off so that a larger CSV doesn't add JIT compilation (tens of ms) to queries of tens of ms.
#  - --no-locale above (C collation): user_ids are ASCII, so ORDER BY user_id is the byte order
#    engage pages in, without locale-aware comparison costs.
cat >>"$DATA/postgresql.conf" <<EOF

# --- engage bench/pg/run.sh ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
shared_buffers = $SHARED_BUFFERS
work_mem = 64MB
maintenance_work_mem = 512MB
max_wal_size = 4GB
jit = off
timezone = 'UTC'
log_timezone = 'UTC'
EOF

PORT=
for attempt in 1 2 3 4 5; do
    PORT=$(free_port) || die "no free port found on 127.0.0.1"
    if as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$LOG" -o "-p $PORT" -w -t 120 start >/dev/null 2>&1; then
        STARTED=1
        break
    fi
    # pg_ctl may have left a running server behind if -w timed out: stop it before retrying.
    as_pg "$PGBIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
done
[[ $STARTED -eq 1 ]] || die "could not start PostgreSQL (see the log above)"

PSQL=("$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PORT" -U postgres)
now_ms() { date +%s%3N; }
ms_since() { echo $(( $(now_ms) - $1 )); }

"${PSQL[@]}" -d postgres -c "CREATE DATABASE bench" >/dev/null
PSQL+=(-d bench)

VERSION=$("${PSQL[@]}" -At -c "SHOW server_version")

# --- 3. Schema and load -----------------------------------------------------------------------
"${PSQL[@]}" -f "$HERE/schema.sql" >/dev/null

t0=$(now_ms)
# The CSV goes through psql's stdin: the root shell opens it, so its permissions don't matter.
"${PSQL[@]}" -c "COPY events (event_id, user_id, name, occurred_at, attributes)
                 FROM STDIN WITH (FORMAT csv, HEADER true)" <"$CSV" >/dev/null
COPY_MS=$(ms_since "$t0")

# --- 4. Indexes, VACUUM ANALYZE ---------------------------------------------------------------
t0=$(now_ms)
"${PSQL[@]}" -f "$HERE/indexes.sql" >/dev/null
INDEX_MS=$(ms_since "$t0")

t0=$(now_ms)
"${PSQL[@]}" -c "VACUUM ANALYZE events" >/dev/null
VACUUM_MS=$(ms_since "$t0")

IFS='|' read -r NROWS TABLE_B INDEXES_B TOTAL_B <<<"$("${PSQL[@]}" -At -F '|' -c "
    SELECT (SELECT count(*) FROM events),
           pg_table_size('events'), pg_indexes_size('events'), pg_total_relation_size('events')")"
INDEX_LIST=$("${PSQL[@]}" -At -c "
    SELECT string_agg('\"' || replace(indexdef, 'public.', '') || '\"', ', ' ORDER BY indexname)
    FROM pg_indexes WHERE tablename = 'events'")

printf '{"engine": "postgresql", "version": "%s", "as_of": "%s", "warmup_runs": %d, "timed_runs": %d, "timing": "client wall time per statement: psql \\\\timing over the local Unix socket, simple query protocol (parse + plan + execute + first page to the client)"}\n' \
    "$VERSION" "$AS_OF" "$WARMUP" "$RUNS"
printf '{"load": {"rows": %d, "copy_ms": %d, "create_indexes_ms": %d, "vacuum_analyze_ms": %d, "total_ms": %d}}\n' \
    "$NROWS" "$COPY_MS" "$INDEX_MS" "$VACUUM_MS" $((COPY_MS + INDEX_MS + VACUUM_MS))
printf '{"table": {"rows": %d, "table_bytes": %d, "indexes_bytes": %d, "total_bytes": %d, "indexes": [%s]}}\n' \
    "$NROWS" "$TABLE_B" "$INDEXES_B" "$TOTAL_B" "$INDEX_LIST"

# --- 5. Queries -------------------------------------------------------------------------------
# run_queries VARIANT DIR: every query, its file from DIR when there is one there, else from
# queries/. The first timed execution is the query's first call on this cluster (after the load,
# the index builds and VACUUM ANALYZE); the median is over the RUNS after WARMUP more.
run_queries() {
    local variant=$1 dir=$2 q file result rows total script times n first
    for q in "${QUERIES[@]}"; do
        file=$dir/$q.sql
        [[ -r $file ]] || file=$HERE/queries/$q.sql
        [[ -r $file ]] || die "missing $file"

        # 1 + WARMUP + RUNS executions in one session; psql prints "Time: X ms" on stdout for
        # each statement, while the results go to /dev/null through \o.
        script=$(
            printf '\\o /dev/null\n\\timing on\n'
            for ((i = 0; i < 1 + WARMUP + RUNS; i++)); do printf '\\i %s\n' "$file"; done
        )
        times=$("${PSQL[@]}" -v as_of="$AS_OF" <<<"$script" | awk '/^Time: / {print $2}')
        n=$(grep -c '' <<<"$times")
        [[ $n -eq $((1 + WARMUP + RUNS)) ]] || die "$q: expected $((1 + WARMUP + RUNS)) timings, got $n"

        # The result itself, once more (untimed): returned rows, and the total that every row
        # carries in its last column.
        result=$("${PSQL[@]}" -At -F '|' -v as_of="$AS_OF" -f "$file")
        if [[ -z $result ]]; then
            rows=0 total=0
        else
            rows=$(grep -c '' <<<"$result")
            total=$(head -n 1 <<<"$result" | awk -F '|' '{print $NF}')
        fi

        first=$(head -n 1 <<<"$times")
        tail -n "$RUNS" <<<"$times" | awk -v q="$q" -v rows="$rows" -v total="$total" \
            -v first="$first" -v variant="$variant" '
            { v[NR] = $1 + 0; list = list (NR > 1 ? ", " : "") sprintf("%.3f", $1) }
            END {
                n = NR
                for (i = 2; i <= n; i++) {            # insertion sort: n is small
                    x = v[i]; j = i - 1
                    while (j >= 1 && v[j] > x) { v[j + 1] = v[j]; j-- }
                    v[j + 1] = x
                }
                med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
                printf "{\"query\": \"%s\", \"variant\": \"%s\", \"first_ms\": %.3f, \"median_ms\": %.3f, \"min_ms\": %.3f, \"rows\": %d, \"total\": %d, \"runs_ms\": [%s]}\n",
                    q, variant, first + 0, med, v[1], rows, total, list
            }'
    done
}

run_queries general "$HERE/queries"

# --- 6. Covering indexes ----------------------------------------------------------------------
# The same queries with what a careful user tuning exactly these would add (covering.sql:
# generated columns for the attributes they read, and indexes that hold them, so every query is
# an index-only scan); the queries that read those columns are in queries/covering/.
t0=$(now_ms)
"${PSQL[@]}" -f "$HERE/covering.sql" >/dev/null
"${PSQL[@]}" -c "VACUUM ANALYZE events" >/dev/null
COVERING_MS=$(ms_since "$t0")
IFS='|' read -r TABLE_B INDEXES_B TOTAL_B <<<"$("${PSQL[@]}" -At -F '|' -c "
    SELECT pg_table_size('events'), pg_indexes_size('events'), pg_total_relation_size('events')")"
printf '{"covering": {"build_ms": %d, "table_bytes": %d, "indexes_bytes": %d, "total_bytes": %d}}\n' \
    "$COVERING_MS" "$TABLE_B" "$INDEXES_B" "$TOTAL_B"
run_queries covering "$HERE/queries/covering"
