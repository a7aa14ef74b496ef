# The README's commands. `make test` works on a fresh Debian machine with a Rust toolchain.
.PHONY: setup test lint check-manifests check-alerts unit bench bench-relay bench-consumer bench-autoscale build demo soak fuzz images kind-e2e

setup:
	@bash scripts/setup.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

test: setup lint
	cargo test --workspace --locked
	$(MAKE) check-manifests
	$(MAKE) check-alerts

# The chart's alert rules: syntax and expressions (promtool check), then series that must and must not fire
# each alert (promtool test, rules/tests/). promtool comes from Debian's `prometheus` package (make setup).
check-alerts: setup
	promtool check rules charts/outbox-operator/rules/outbox.rules.yaml
	cd charts/outbox-operator/rules/tests && promtool test rules outbox.rules.test.yaml

# The Helm chart rendered by Helm's library and every manifest (chart, operator-created objects) validated
# against the Kubernetes OpenAPI schemas; see scripts/check-manifests.py.
CACHE ?= $(or $(OUTBOX_CACHE),$(HOME)/.cache/outbox-operator)
check-manifests: setup
	@mkdir -p target
	cargo run -q --locked -p operator --example plan_objects > target/planned-objects.yaml
	$(CACHE)/manifests-venv/bin/python scripts/check-manifests.py charts/outbox-operator target/planned-objects.yaml crds kind-config.yaml examples

bench: bench-relay bench-consumer bench-autoscale

bench-relay: setup
	cargo build --release --locked -p relay --bins --examples
	./target/release/examples/bench_relay

bench-consumer: setup
	cargo build --release --locked -p consumer-runtime --examples
	./target/release/examples/bench_consumer

# ConsumerGroup autoscaling: scale changes on a noisy lag series, and lag → replicas reaction time on the
# test bed's control plane.
bench-autoscale: setup
	cargo build --release --locked -p operator --examples
	./target/release/examples/bench_autoscale

# The chaos soak: the demo stack (two relays in Lease mode on the test bed's control plane, or single mode
# without it) under a steady order load while a seeded driver kills, pauses and restarts its parts; the
# ledger line at the end, exit 1 on a broken guarantee. SEED=N replays a fault schedule; ORDERS=N sizes it.
# The broker is a three-node Apache Kafka cluster (KAFKA=tansu: tansu behind a proxy).
ORDERS ?= 100000
soak: build
	./target/debug/outbox-soak --orders $(ORDERS) $(if $(SEED),--seed $(SEED)) $(if $(KAFKA),--kafka $(KAFKA))

# Fuzzing where outside bytes come in (NewEvent validation, the consumer's record decoding, the demo API's
# request bodies, custom resource specs): proptest-driven, FUZZ_SECONDS per target (see
# test-support/src/fuzz.rs for why not cargo-fuzz). `make test` runs the same targets for 2,000 inputs each.
FUZZ_SECONDS ?= 60
fuzz: setup
	@mkdir -p target
	bash -o pipefail -c 'FUZZ_SECONDS=$(FUZZ_SECONDS) cargo test --locked -p outbox -p consumer-runtime -p demo-consumer -p demo-api \
	  -p operator --test fuzz -- --nocapture --test-threads 1 2>&1 | tee target/fuzz.log | grep -oE "fuzz .* inputs in .*|panicked.*|minimal input|replay|test result"'
	@awk '/fuzz .* inputs in/ {n += $$(NF-7); s += $$(NF-4)} END {printf "fuzz: %d inputs in %.0f s over all targets, no failure\n", n, s}' target/fuzz.log

# Every binary of the workspace (debug profile: quick to build, plenty fast for the demo).
build: setup
	cargo build --workspace --bins --locked

# The whole pipeline on this machine until Ctrl-C. LOAD=N posts N orders and prints a report;
# DATABASE_URL / KAFKA_BOOTSTRAP use a real PostgreSQL / Kafka instead of the throwaway ones.
LOAD ?= 0
demo: build
	./target/debug/outbox-demo --load $(LOAD)

# Container images (Docker): one build, four targets, tagged for the Helm chart's values.
REGISTRY ?= ghcr.io/outbox-operator
TAG ?= $(shell sed -n 's/^appVersion: *"\(.*\)"/\1/p' charts/outbox-operator/Chart.yaml)
IMAGES := outbox-operator outbox-relay demo-consumer demo-api
images:
	@for i in $(IMAGES); do docker build --target $$i -t $(REGISTRY)/$$i:$(TAG) . || exit 1; done

# End-to-end on kind (needs docker, kind, kubectl, helm; skipped with a message otherwise). Not run by CI.
kind-e2e:
	@bash scripts/kind-e2e.sh
