#!/usr/bin/env bash
# bench/run.sh: the `make bench` driver.
#
# Starts notifd (from this build), redis-server, nats-server and mosquitto on loopback,
# one at a time, pinned to one CPU, and drives each with notif-bench pinned to another;
# every scenario runs RUNS times on a freshly started server; prints one table of
# medians with the ratios notifd / peer and writes it into BENCHMARKS.md.
#
# Knobs (environment): RUNS=3  SERVERS="notifd redis nats mqtt"  DURATION=5 (s per
# throughput run)  LAT_DURATION=10  CONNS=19000 (capped by the open-files limit)
# SERVER_CPU=0  GEN_CPU=1  SAT=0.90 (generator CPU share above which it is the
# bottleneck)  BENCH_OUT=BENCHMARKS.md (empty: do not write)  SCENARIOS="fanout
# latency pairs conns durable replay tls"  REPLAY_COUNT=1000000 (notifications replayed)
# TLS_CONNS=10000.
#
# The "tls" scenario starts each server again with only a TLS port, all four with the
# same certificate (made here by openssl, for localhost, signed by a CA made here), and
# measures fan-out (S = 100 and 1,000), p99 at the fixed rate and bytes per idle TLS
# connection, the generator speaking TLS too (--tls --ca).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SERVERS=${SERVERS:-notifd redis nats mqtt}
SCENARIOS=${SCENARIOS:-fanout latency pairs conns durable replay tls}
REPLAY_COUNT=${REPLAY_COUNT:-1000000}
TLS_CONNS=${TLS_CONNS:-10000}
DURATION=${DURATION:-5}
LAT_DURATION=${LAT_DURATION:-10}
SERVER_CPU=${SERVER_CPU:-0}
GEN_CPU=${GEN_CPU:-1}
SAT=${SAT:-0.90}
BENCH_OUT=${BENCH_OUT-BENCHMARKS.md}
TARGET=${CARGO_TARGET_DIR:-target}
export PATH="$PATH:/usr/sbin:/sbin"

say() { printf 'bench: %s\n' "$*" >&2; }

# --- peers from Debian's packages, installed when missing -------------------------
missing=""
command -v redis-server >/dev/null || missing="$missing redis-server"
command -v nats-server >/dev/null || missing="$missing nats-server"
command -v mosquitto >/dev/null || missing="$missing mosquitto"
if [ -n "$missing" ]; then
	say "installing$missing"
	SUDO=""
	[ "$(id -u)" -eq 0 ] || SUDO=sudo
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
command -v taskset >/dev/null || { say "taskset (util-linux) is needed"; exit 1; }
case " $SCENARIOS " in *" tls "*) command -v openssl >/dev/null || { say "openssl is needed for the tls scenario"; exit 1; } ;; esac

say "building (release)"
cargo build --release --bins >&2
GEN=$TARGET/release/notif-bench
NOTIFD=$TARGET/release/notifd

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
CONNS=${CONNS:-19000}
if [ "$NOFILE" != unlimited ] && [ "$CONNS" -gt $((NOFILE - 1000)) ]; then
	CONNS=$((NOFILE - 1000))
	say "open-files limit $NOFILE: connection scenario lowered to $CONNS"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/notifd-bench.XXXXXX")
SPID=""
cleanup() {
	stop_server
	rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ROWS=$TMP/rows
RESULTS=$TMP/results
# The generator's extra arguments: --tls --ca FILE while a server runs in TLS mode.
GEN_EXTRA=()
: >"$ROWS"
: >"$RESULTS"

# Below the ephemeral range: the connection scenario leaves thousands of client ports
# of 127.0.0.x in TIME_WAIT, and a server cannot bind a port still held by one of them.
EPHEMERAL_LOW=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
free_port() {
	local p i
	for i in $(seq 1 200); do
		p=$((10000 + RANDOM % (EPHEMERAL_LOW - 10000)))
		if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
			echo "$p"
			return
		fi
	done
	say "no free port found"
	exit 1
}

# wait_ready PORT [LOG]: the server accepts (notifd: says "listening on" in its log).
wait_ready() {
	local i
	for i in $(seq 1 300); do
		kill -0 "$SPID" 2>/dev/null || return 1
		if [ -n "${2:-}" ]; then
			grep -q "listening on" "$2" 2>/dev/null && return 0
		elif (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
			return 0
		fi
		sleep 0.1
	done
	return 1
}

# make_cert: a CA and a certificate for localhost (and 127.0.0.1) it signs, in $TMP/tls,
# readable by the servers whatever user they switch to.
make_cert() {
	local d=$TMP/tls
	[ -f "$d/server.pem" ] && return 0
	mkdir -p "$d"
	chmod 755 "$TMP" "$d"
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
		-subj /CN=notif-bench-ca -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
	openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
		-subj /CN=localhost -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
	printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' \
		>"$d/ext.cnf"
	openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
		-days 2 -extfile "$d/ext.cnf" -out "$d/server.pem" 2>/dev/null
	chmod 644 "$d"/*
}

# start_server NAME MODE: MODE is "live" (mail_transport none), "durable" (sync full),
# "untrusted" (durable, with a publish_token so the generator is untrusted), "replay"
# (notifd's database kept in $TMP/replay.db across starts) or "tls" (live, with only a
# TLS port, the certificate of make_cert).
# Sets SPID and PORT. The server and every process it forks inherit the CPU pinning.
start_server() {
	local name=$1 mode=$2 dir=$TMP/$1 tls=$TMP/tls
	rm -rf "$dir"
	mkdir -p "$dir"
	PORT=$(free_port)
	GEN_EXTRA=()
	if [ "$mode" = tls ]; then
		make_cert
		GEN_EXTRA=(--tls --ca "$tls/ca.pem")
	fi
	case $name in
	notifd)
		{
			echo "host = \"127.0.0.1\""
			echo "port = $PORT"
			if [ "$mode" = replay ]; then
				echo "database = \"$TMP/replay.db\""
			else
				echo "database = \"$dir/notifd.db\""
			fi
			echo "mail_transport = \"none\""
			echo "log = \"$dir/notifd.log\""
			echo "max_clients = $((CONNS + 2000))"
			echo "max_clients_per_ip = $((CONNS + 2000))"
			echo "max_clients_per_net = $((CONNS + 2000))"
			if [ "$mode" = durable ] || [ "$mode" = untrusted ]; then
				echo "sync = \"full\""
				echo "max_subs_per_conn = 1000000"
			fi
			if [ "$mode" = untrusted ]; then
				# A token makes the loopback generator an untrusted client: every SUB
				# stores a pending pair (one address per SUB), with the limits raised.
				echo "publish_token = \"bench-token-0123456789abcdef\""
				echo "sub_rate = 100000000"
				echo "max_unconfirmed = 100000000"
			fi
			if [ "$mode" = tls ]; then
				echo "plain = false"
				echo "tls_port = $PORT"
				echo "tls_cert_file = \"$tls/server.pem\""
				echo "tls_key_file = \"$tls/server.key\""
			fi
		} >"$dir/notifd.conf"
		taskset -c "$SERVER_CPU" "$NOTIFD" -c "$dir/notifd.conf" >"$dir/stderr" 2>&1 &
		SPID=$!
		wait_ready "$PORT" "$dir/notifd.log"
		;;
	redis)
		local ports=(--port "$PORT")
		if [ "$mode" = tls ]; then
			ports=(--port 0 --tls-port "$PORT" --tls-cert-file "$tls/server.pem"
				--tls-key-file "$tls/server.key" --tls-ca-cert-file "$tls/ca.pem" --tls-auth-clients no)
		fi
		taskset -c "$SERVER_CPU" redis-server "${ports[@]}" --bind 127.0.0.1 \
			--save '' --appendonly no --protected-mode no --daemonize no \
			--maxclients $((CONNS + 2000)) --logfile "$dir/redis.log" >"$dir/stderr" 2>&1 &
		SPID=$!
		wait_ready "$PORT"
		;;
	nats)
		local tlsargs=()
		if [ "$mode" = tls ]; then
			tlsargs=(--tls --tlscert "$tls/server.pem" --tlskey "$tls/server.key")
		fi
		taskset -c "$SERVER_CPU" nats-server -a 127.0.0.1 -p "$PORT" "${tlsargs[@]}" \
			-l "$dir/nats.log" >"$dir/stderr" 2>&1 &
		SPID=$!
		wait_ready "$PORT"
		;;
	mqtt)
		printf 'listener %s 127.0.0.1\nallow_anonymous true\nlog_dest none\n' "$PORT" \
			>"$dir/mosquitto.conf"
		if [ "$mode" = tls ]; then
			printf 'certfile %s\nkeyfile %s\n' "$tls/server.pem" "$tls/server.key" >>"$dir/mosquitto.conf"
		fi
		taskset -c "$SERVER_CPU" mosquitto -c "$dir/mosquitto.conf" >"$dir/stderr" 2>&1 &
		SPID=$!
		wait_ready "$PORT"
		;;
	esac
}

# start_server with a second and third chance (another program may take the port).
start_retry() {
	local i
	for i in 1 2 3; do
		start_server "$@" && return 0
		stop_server
	done
	return 1
}

stop_server() {
	[ -n "$SPID" ] || return 0
	kill -TERM "$SPID" 2>/dev/null || true
	local i
	for i in $(seq 1 100); do
		kill -0 "$SPID" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$SPID" 2>/dev/null || true
	wait "$SPID" 2>/dev/null || true
	SPID=""
}

field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<"$1"; }

# record ROW SERVER VALUE GEN_CPU
record() { echo "$1 $2 $3 $4" >>"$ROWS"; }

# gen SERVER ARGS...: runs the generator pinned; prints its RESULT line.
gen() {
	local server=$1
	shift
	local out
	if ! out=$(taskset -c "$GEN_CPU" "$GEN" --server "$server" --addr "127.0.0.1:$PORT" "${GEN_EXTRA[@]}" "$@" \
		2>>"$TMP/gen.err"); then
		say "generator failed: $server $* (see below)"
		tail -n 5 "$TMP/gen.err" >&2
		return 1
	fi
	echo "$out" | tee -a "$RESULTS" >&2
	echo "$out" | grep '^RESULT' | tail -n 1
}

has() { case " $SCENARIOS " in *" $1 "*) return 0 ;; esac; return 1; }

# fanouts PREFIX SERVER: fan-out to 100 and 1,000 subscribers, as rows PREFIXfanout….
fanouts() {
	local prefix=$1 s=$2 subs r c
	for subs in 100 1000; do
		if r=$(gen "$s" --scenario fanout --subs $subs --duration "$DURATION"); then
			c=$(field "$r" gen_cpu)
			record "${prefix}fanout$subs" "$s" "$(field "$r" msgs_per_s)" "$c"
			record "${prefix}fanout${subs}_lost" "$s" "$(field "$r" lost)" "$c"
			record "${prefix}fanout${subs}_p99" "$s" "$(field "$r" p99_us)" "$c"
		fi
	done
}

# idle_conns PREFIX SERVER MODE N: N idle subscribed connections to a freshly started
# server (its memory before them is its memory at rest), as rows PREFIXconns….
idle_conns() {
	local prefix=$1 s=$2 mode=$3 n=$4 r
	if start_retry "$s" "$mode"; then
		sleep 1
		if r=$(gen "$s" --scenario conns --conns "$n" --pid "$SPID" --settle 10 --timeout 600); then
			record "${prefix}conns_bytes" "$s" "$(field "$r" bytes_per_conn)" "$(field "$r" gen_cpu)"
			record "${prefix}conns_open" "$s" "$(field "$r" open_after_settle)" "$(field "$r" gen_cpu)"
		fi
	fi
	stop_server
}

run_live() {
	local s=$1 r
	if ! start_retry "$s" live; then
		say "$s did not start; skipping it (log: $(tail -n 3 "$TMP/$s"/*.log "$TMP/$s/stderr" 2>/dev/null | tr '\n' ' '))"
		stop_server
		return
	fi
	if has fanout; then
		fanouts "" "$s"
	fi
	if has latency && r=$(gen "$s" --scenario latency --subs 100 --rate 1000 --duration "$LAT_DURATION"); then
		for k in p50 p99 max; do
			record "latency_$k" "$s" "$(field "$r" "${k}_us")" "$(field "$r" gen_cpu)"
		done
	fi
	if has pairs && r=$(gen "$s" --scenario pairs --pairs 100 --duration "$DURATION"); then
		record pairs "$s" "$(field "$r" msgs_per_s)" "$(field "$r" gen_cpu)"
	fi
	stop_server
	if has conns; then
		idle_conns "" "$s" live "$CONNS"
	fi
}

# run_tls SERVER: the same server with only a TLS port: fan-out, p99 at the fixed rate,
# then, freshly started, bytes per idle TLS connection.
run_tls() {
	local s=$1 r
	if ! start_retry "$s" tls; then
		say "$s did not start with TLS; skipping it (log: $(tail -n 3 "$TMP/$s"/*.log "$TMP/$s/stderr" 2>/dev/null | tr '\n' ' '))"
		stop_server
		return
	fi
	fanouts tls_ "$s"
	if r=$(gen "$s" --scenario latency --subs 100 --rate 1000 --duration "$LAT_DURATION"); then
		record tls_latency_p99 "$s" "$(field "$r" p99_us)" "$(field "$r" gen_cpu)"
	fi
	stop_server
	idle_conns tls_ "$s" tls "$TLS_CONNS"
	GEN_EXTRA=()
}

run_durable() {
	local r kind conns
	if start_retry notifd durable; then
		for kind in sub pub; do
			for conns in 10 100; do
				if r=$(gen notifd --scenario durable --kind $kind --conns $conns --inflight 64 \
					--duration "$DURATION"); then
					record "durable_${kind}_$conns" notifd "$(field "$r" acked_per_s)" "$(field "$r" gen_cpu)"
				fi
			done
		done
	else
		say "notifd did not start for the durable scenario; skipping it"
	fi
	stop_server
	if start_retry notifd untrusted; then
		if r=$(gen notifd --scenario durable --kind sub --conns 100 --inflight 64 --duration "$DURATION"); then
			record durable_sub_untrusted_100 notifd "$(field "$r" acked_per_s)" "$(field "$r" gen_cpu)"
		fi
	else
		say "notifd did not start for the untrusted SUB scenario; skipping it"
	fi
	stop_server
}

# replay: notifd makes its database, is stopped while REPLAY_COUNT notifications are
# added to it, and replays them all to one connection (WATCH SINCE 0), each run anew.
run_replay() {
	local r
	rm -f "$TMP"/replay.db*
	if ! start_retry notifd replay; then
		say "notifd did not start for the replay scenario; skipping it"
		stop_server
		return
	fi
	stop_server
	if ! "$GEN" --scenario replay-fill --db "$TMP/replay.db" --count "$REPLAY_COUNT" >>"$TMP/gen.err" 2>&1; then
		say "replay-fill failed (see $TMP/gen.err)"
		return
	fi
	if start_retry notifd replay; then
		if r=$(gen notifd --scenario replay --count "$REPLAY_COUNT" --timeout 300); then
			record replay notifd "$(field "$r" msgs_per_s)" "$(field "$r" gen_cpu)"
		fi
	fi
	stop_server
}

run_sqlite() {
	local out line
	out=$(taskset -c "$GEN_CPU" "$GEN" --scenario sqlite --db "$TMP/baseline.db" \
		--duration "$DURATION" 2>>"$TMP/gen.err") || { say "sqlite baseline failed"; return; }
	echo "$out" | tee -a "$RESULTS" >&2
	while read -r line; do
		record "sqlite_$(field "$line" mode)" sqlite "$(field "$line" rows_per_s)" "$(field "$line" gen_cpu)"
	done < <(grep '^RESULT' <<<"$out")
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for run in $(seq 1 "$RUNS"); do
	for s in $SERVERS; do
		say "run $run/$RUNS: $s"
		if [ "$s" = notifd ] && [ ! -x "$NOTIFD" ]; then
			say "no $NOTIFD; skipping notifd"
			continue
		fi
		run_live "$s"
		if has tls; then
			run_tls "$s"
		fi
		if [ "$s" = notifd ] && has durable; then
			run_durable
		fi
		if [ "$s" = notifd ] && has replay; then
			run_replay
		fi
	done
	if has durable; then
		run_sqlite
	fi
done

# --- the table ------------------------------------------------------------------
median() {
	sort -g | awk '{a[NR]=$1} END {
		if (NR == 0) print "-"; else if (NR % 2) print a[(NR+1)/2];
		else printf "%.0f\n", (a[NR/2]+a[NR/2+1])/2 }'
}
# value ROW SERVER: median of the runs' values; cpu ROW SERVER: median generator CPU.
value() { awk -v r="$1" -v s="$2" '$1==r && $2==s {print $3}' "$ROWS" | median; }
cpu() { awk -v r="$1" -v s="$2" '$1==r && $2==s {print $4}' "$ROWS" | sort -g | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print 0}'; }
saturated() { awk -v c="$(cpu "$1" "$2")" -v t="$SAT" 'BEGIN {exit !(c >= t)}'; }
cell() {
	local v
	v=$(value "$1" "$2")
	if [ "$v" != - ] && saturated "$1" "$2"; then v="$v*"; fi
	printf '%s' "$v"
}
ratio() { # ratio ROW A B: A/B, "n/v" when either generator was saturated
	local a b
	a=$(value "$1" "$2")
	b=$(value "$1" "$3")
	if [ "$a" = - ] || [ "$b" = - ]; then printf -- '-'; return; fi
	if saturated "$1" "$2" || saturated "$1" "$3"; then printf 'n/v'; return; fi
	awk -v a="$a" -v b="$b" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'
}

PEERS=""
for s in redis nats mqtt; do case " $SERVERS " in *" $s "*) PEERS="$PEERS $s" ;; esac; done
TABLE=$TMP/table
{
	printf '| figure | better |'
	for s in $SERVERS; do printf ' %s |' "$([ "$s" = mqtt ] && echo mosquitto || echo "$s")"; done
	for p in $PEERS; do printf ' notifd/%s |' "$([ "$p" = mqtt ] && echo mosquitto || echo "$p")"; done
	printf '\n|---|---|'
	for _ in $SERVERS $PEERS; do printf -- '---:|'; done
	printf '\n'
	while IFS='|' read -r row label better; do
		grep -q "^$row " "$ROWS" || continue
		printf '| %s | %s |' "$label" "$better"
		for s in $SERVERS; do printf ' %s |' "$(cell "$row" "$s")"; done
		for p in $PEERS; do printf ' %s |' "$(ratio "$row" notifd "$p")"; done
		printf '\n'
	done <<-'EOF'
		fanout100|fan-out, 100 subscribers: delivered msgs/s|higher
		fanout100_p99|fan-out, 100 subscribers: p99 µs (saturated)|lower
		fanout100_lost|fan-out, 100 subscribers: lost|lower
		fanout1000|fan-out, 1,000 subscribers: delivered msgs/s|higher
		fanout1000_p99|fan-out, 1,000 subscribers: p99 µs (saturated)|lower
		fanout1000_lost|fan-out, 1,000 subscribers: lost|lower
		latency_p50|1,000 pub/s to 100 subscribers: p50 µs|lower
		latency_p99|1,000 pub/s to 100 subscribers: p99 µs|lower
		latency_max|1,000 pub/s to 100 subscribers: max µs|lower
		pairs|100 publisher→subscriber pairs: delivered msgs/s|higher
		conns_bytes|idle subscribed connections: server bytes per connection|lower
		conns_open|idle subscribed connections: still open after 10 s|higher
		replay|replay of 1,000,000 kept notifications to one connection: msgs/s|higher
		tls_fanout100|TLS fan-out, 100 subscribers: delivered msgs/s|higher
		tls_fanout100_p99|TLS fan-out, 100 subscribers: p99 µs (saturated)|lower
		tls_fanout100_lost|TLS fan-out, 100 subscribers: lost|lower
		tls_fanout1000|TLS fan-out, 1,000 subscribers: delivered msgs/s|higher
		tls_fanout1000_p99|TLS fan-out, 1,000 subscribers: p99 µs (saturated)|lower
		tls_fanout1000_lost|TLS fan-out, 1,000 subscribers: lost|lower
		tls_latency_p99|TLS, 1,000 pub/s to 100 subscribers: p99 µs|lower
		tls_conns_bytes|idle subscribed TLS connections: server bytes per connection|lower
		tls_conns_open|idle subscribed TLS connections: still open after 10 s|higher
	EOF
} >"$TABLE"

DTABLE=$TMP/dtable
if grep -qE '^(durable|sqlite)_' "$ROWS"; then
	{
		echo '| figure | acknowledged/s | ÷ SQLite 1 row per transaction | ÷ SQLite 64 rows per transaction | ÷ SQLite 10,000 rows per transaction |'
		echo '|---|---:|---:|---:|---:|'
		while IFS='|' read -r row label; do
			grep -q "^$row " "$ROWS" || continue
			printf '| %s | %s |' "$label" "$(cell "$row" "$(awk -v r="$row" '$1==r {print $2; exit}' "$ROWS")")"
			if [[ $row == durable_* ]]; then
				for base in sqlite_row sqlite_batch64 sqlite_batch10000; do
					a=$(value "$row" notifd)
					b=$(value "$base" sqlite)
					if [ "$a" = - ] || [ "$b" = - ] || saturated "$row" notifd; then printf ' %s |' "$([ "$a" = - ] || [ "$b" = - ] && echo - || echo n/v)"
					else awk -v a="$a" -v b="$b" 'BEGIN { if (b == 0) printf " - |"; else printf " %.2f |", a / b }'; fi
				done
			else
				printf ' | | |'
			fi
			printf '\n'
		done <<-'EOF'
			durable_sub_10|notifd SUB, 10 connections × 64 in flight, sync = full
			durable_sub_100|notifd SUB, 100 connections × 64 in flight, sync = full
			durable_sub_untrusted_100|notifd untrusted SUB (pending, one address each), 100 connections × 64 in flight, sync = full
			durable_pub_10|notifd PUB, 10 connections × 64 in flight, sync = full
			durable_pub_100|notifd PUB, 100 connections × 64 in flight, sync = full
			sqlite_row|SQLite alone, 1 row per transaction (rows/s)
			sqlite_batch64|SQLite alone, 64 rows per transaction (rows/s)
			sqlite_batch10000|SQLite alone, 10,000 rows per transaction (rows/s)
		EOF
	} >"$DTABLE"
else
	: >"$DTABLE"
fi

CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
MACHINE="$(uname -srm); ${CPU_MODEL:-unknown CPU}; $(nproc) CPUs; $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM; filesystem of $TMP: $(df -T "$TMP" | awk 'NR==2 {print $2}')"
VERSIONS="notifd $(git describe --always --dirty 2>/dev/null || echo '?'); $(redis-server --version 2>/dev/null | awk '{print $1, $3}'); nats-server $(nats-server --version 2>/dev/null | awk '{print $NF}'); mosquitto $( (mosquitto -h 2>/dev/null || true) | awk 'NR==1 {print $3}')"
REPORT=$TMP/report
{
	echo "Measured $(date -u +%Y-%m-%dT%H:%M:%SZ) with \`make bench\` (RUNS=$RUNS, DURATION=${DURATION}s, CONNS=$CONNS): medians of $RUNS runs."
	echo
	echo "- machine: $MACHINE"
	echo "- versions: $VERSIONS"
	echo "- load average (1, 5, 15 min) before: $LOAD_BEFORE; after: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine makes every figure worse and noisier)"
	echo "- server pinned to CPU $SERVER_CPU, generator to CPU $GEN_CPU (taskset); \`*\` marks a figure whose generator used ≥ $SAT of its CPU (the generator may have been the bottleneck), and \`n/v\` a ratio that is not valid for that reason."
	echo
	cat "$TABLE"
	if [ -s "$DTABLE" ]; then
		echo
		cat "$DTABLE"
	fi
} >"$REPORT"

echo
cat "$REPORT"

if [ -n "$BENCH_OUT" ] && [ -f "$BENCH_OUT" ] && grep -q '<!-- bench:begin -->' "$BENCH_OUT"; then
	awk -v report="$REPORT" '
		/<!-- bench:begin -->/ { print; while ((getline l < report) > 0) print l; skip = 1; next }
		/<!-- bench:end -->/ { skip = 0 }
		!skip { print }' "$BENCH_OUT" >"$TMP/out.md"
	cat "$TMP/out.md" >"$BENCH_OUT"
	say "table written into $BENCH_OUT"
fi
