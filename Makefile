# The README's commands. `make test` works on a fresh Debian machine with a Rust toolchain.
.PHONY: setup test lint unit bench bench-relay demo

setup:
	@bash scripts/setup.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

test: setup lint
	cargo test --workspace --locked

bench: bench-relay

bench-relay: setup
	cargo build --release --locked -p relay --bins --examples
	./target/release/examples/bench_relay

demo:
	@echo "make demo: the whole pipeline (consumer runtime, demo API) is not built yet; see the README." >&2
	@exit 2
