# tunmesh: sidecar-free service mesh for Kubernetes.
# `make demo` runs the local demo cluster, `make test` runs every test.
# Both install what they need (Debian packages, Kubernetes binaries) first.

SHELL   := /bin/bash
export PATH := $(PATH):/usr/local/go/bin
GO      ?= go
BIN     := bin
CMDS    := ./tools/cmd/tunmeshctl ./tools/cmd/tunmesh-workload ./identity/cmd/tunmesh-identity ./node/cmd/tunmesh-node ./cni/cmd/tunmesh-cni ./cni/cmd/tunmesh-cni-install ./tools/cmd/tunmesh-images ./tools/cmd/tunmesh-pause ./tools/cmd/tunmesh-bench
# Packages whose tests run under the race detector (all but the end-to-end
# suite, which drives whole binaries).
UNIT    := $(shell $(GO) list ./... 2>/dev/null | grep -v /tools/e2e)

.PHONY: all deps build images test unit e2e soak demo demo-down bench bench-memory bench-go lint clean

all: build

deps:
	tools/scripts/deps.sh

build:
	$(GO) build ./...
	$(GO) build -o $(BIN)/ $(CMDS)

# OCI archives of tunmesh's images (static binaries, reproducible digests)
# under bin/images/, for `ctr images import` or pushing; see docs/images.md.
images:
	$(GO) run ./tools/cmd/tunmesh-images -o $(BIN)/images

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

unit:
	$(GO) test -race -count=1 -timeout 10m $(UNIT)

e2e:
	$(GO) test -count=1 -p 1 -timeout 25m -v ./tools/e2e/...

# The 10-minute soak: a CronJob every minute on real nodes, agent
# goroutines/fds/NICs/memory bounded (not part of make test).
soak: deps build
	TUNMESH_E2E_SOAK=1 $(GO) test -count=1 -p 1 -timeout 30m -v -run TestCronJobSoak ./tools/e2e/realnode/

test: deps build lint unit e2e

demo: deps build images
	tools/demo/demo.sh

demo-down:
	$(BIN)/tunmeshctl dev down

# The benchmark of docs/performance.md (not part of make test; a report:
# missed targets do not fail it) on a local cluster named bench: kernel vs
# an HAProxy mTLS sidecar pair vs tunmesh; bench-memory: the agents' memory
# at 100 pods and 1,000 idle connections. BENCH_FLAGS passes flags
# (--reps, --out, ...; bin/tunmesh-bench -h).
bench: deps build
	$(BIN)/tunmesh-bench $(BENCH_FLAGS)

bench-memory: deps build
	$(BIN)/tunmesh-bench --mode memory $(BENCH_FLAGS)

# The Go micro-benchmarks (netstack, tunnel splice, ...) and the e2e
# BenchmarkMeshVsPlain.
bench-go: deps build
	$(GO) test -run '^$$' -bench . -benchtime 20x -count 1 ./...

clean:
	-[ -x $(BIN)/tunmeshctl ] && $(BIN)/tunmeshctl dev down
	rm -rf $(BIN)
