# The two set-up commands a newcomer needs are `make demo` and `make test`; each prepares
# everything it needs first (scripts/bootstrap.sh).
VENV := .venv/bin
export PATH := $(CURDIR)/$(VENV):$(PATH)

.PHONY: bootstrap bootstrap-test demo test test-latest lock check-lock lint typecheck unit bench-enroll bench-attest bench-chacha bench-broker bench-bridge bench-sim soak clean

# `make demo` needs the runtime packages; tests and benchmarks also need the real peers.
bootstrap:
	@scripts/bootstrap.sh scripts/debian-packages.txt

bootstrap-test:
	@scripts/bootstrap.sh scripts/debian-packages.txt scripts/debian-packages-test.txt
	@scripts/get-nats-server.sh >/dev/null  # nats-server >= 2.10 for the fabric tests

demo: bootstrap
	@scripts/get-nats-server.sh >/dev/null || echo "demo: no nats-server >= 2.10, the scale-out part is skipped"
	$(VENV)/python scripts/demo.py

# The lock (requirements/) must be the lock of pyproject.toml; `make lock` refreshes it on purpose.
check-lock: bootstrap-test
	$(VENV)/python scripts/check_lock.py

lock:
	scripts/lock.sh $(ARGS)

# Not in CI: the suite on the newest releases of every dependency, in a throw-away venv, so a
# release that would break the next `make lock` shows up before the lock is bumped.
test-latest: bootstrap-test
	scripts/test_latest.sh $(PYTEST_ARGS)

lint: bootstrap-test check-lock
	$(VENV)/ruff check fleetgate enrollment broker device_sdk firmware_sim tests scripts
	$(VENV)/ruff format --check fleetgate enrollment broker device_sdk firmware_sim tests scripts

typecheck: bootstrap-test
	$(VENV)/mypy

unit: bootstrap-test
	$(VENV)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck unit

bench-enroll: bootstrap-test
	$(VENV)/python scripts/bench_enroll.py

# Attested enrollment step by step: a TPM on swtpm (+ tpm2-abrmd) and a PIV card on the virtual
# card (pcscd + vpcd), each through the SDK's station code against `fleetgate serve enrollment`.
# Last line: tpm_enroll_ms=… card_enroll_ms=… station_overhead_pct=…
bench-attest: bootstrap-test
	$(VENV)/python scripts/bench_attest.py

# Never removes fleet-data: that is the default data directory, CA keys included.
clean:
	rm -rf .venv demo-data .pytest_cache .mypy_cache .ruff_cache

# Device SDK TLS 1.3 bulk throughput, ChaCha20 vs AES-GCM policy, with AES-NI masked and natively.
bench-chacha: bootstrap-test
	$(VENV)/python scripts/bench_chacha.py

# fleetgate's MQTT broker beside Debian's Mosquitto, same certificates and load generator:
# mTLS connects/s, QoS 0/1 fan-in, memory per idle connection, revoke -> kick latency.
bench-broker: bootstrap-test
	$(VENV)/python scripts/bench_broker.py

# Bridge: device -> fleetgate -> bridge -> upstream Mosquitto beside devices -> Mosquitto, and the
# catch-up after a 30 s upstream outage. Last line: bridged_ratio=… outage_lost=… catchup_msgs_per_s=…
bench-bridge: bootstrap-test
	$(VENV)/python scripts/bench_bridge.py

# Not in CI: 10,000 mTLS devices held 10 minutes (1 msg/min each) while one device runs every
# issue-11 attack in turn; drops, RSS and descriptor growth, audit bytes, p99 under attack.
# Short run: make soak ARGS="--conns 2000 --minutes 2". Last line: soak_conns=… minutes=… drops=…
# rss_growth_pct=… audit_mib=… attack_p99_ratio=…
soak: bootstrap-test
	$(VENV)/python scripts/soak.py $(ARGS)

# Fleet simulation at scale: 10,000 software-key devices enrolled over EST and connected over
# mTLS, 60 s at 1 msg/s QoS 1, then a broker SIGKILL; each phase with what bounded it.
# Last line: sim_devices=… online_s=… delivered_ratio=… lost=… recovery_s=…
bench-sim: bootstrap-test
	$(VENV)/python scripts/bench_sim.py $(BENCH_ARGS)

# Fabric: QoS 0/1 fan-in across two broker nodes on a 3-node NATS cluster beside the embedded
# node, CPU per message; sessions/kick hooks. Last line: fabric_q0_ratio=… fabric_q1_ratio=…
# failover_s=… failover_lost=… kick_p99_ms=… session_kib=…
.PHONY: bench-fabric
bench-fabric: bootstrap-test
	$(VENV)/python scripts/bench_fabric.py $(BENCH_ARGS)

# Coverage-guided fuzzing (atheris, libFuzzer) of the MQTT codec, the broker connection and the
# enrollment parsers: over a million inputs, each under a timeout and an RSS limit; a crash input
# lands in tests/fuzz/crashes/. Last line: fuzz_inputs=… crashes=0 hangs=0 … max_rss_mb=…
.PHONY: fuzz
fuzz: bootstrap-test
	$(VENV)/python tests/fuzz/run.py $(FUZZ_ARGS)
