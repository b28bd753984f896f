#!/usr/bin/env bash
# Mutation testing with mutmut, one module at a time, on a snapshot copy of the tree.
# On demand only (never in CI): see docs/MUTATION.md.
#
#   bash scripts/mutation.sh [--head] [--baseline] [--cap SECONDS] [--jobs N] [MODULE...]
#
# MODULE is one of: queue exit_handler vm controller (default: all four, one after another).
#   --head      snapshot the last commit (git archive HEAD) instead of the work tree, with
#               the work tree's tests/mutation_kills
#   --baseline  leave tests/mutation_kills out of the snapshot (the kill rate without them)
#   --cap       wall-clock limit per module in seconds (default 1500); a capped run reports
#               the mutants it finished
#   --jobs      mutmut's parallel test processes (default 1: the machine is shared)
# Environment: MUTATION_DIR (default /tmp/strato-mutation) holds the snapshots and reports.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${MUTATION_DIR:-/tmp/strato-mutation}
head=0 baseline=0 cap=1500 jobs=1 modules=()
while [ $# -gt 0 ]; do
    case $1 in
        --head) head=1 ;;
        --baseline) baseline=1 ;;
        --cap) cap=$2; shift ;;
        --jobs) jobs=$2; shift ;;
        -h|--help) sed -n 2,14p "$0"; exit 0 ;;
        -*) echo "mutation.sh: unknown option $1" >&2; exit 2 ;;
        *) modules+=("$1") ;;
    esac
    shift
done
[ ${#modules[@]} -gt 0 ] || modules=(queue exit_handler vm controller)

if ! command -v mutmut >/dev/null; then
    echo "mutation.sh: mutmut is missing: pip install -e '.[mutation]'" >&2
    exit 2
fi

# The module to mutate and the tests that exercise it (mutmut then runs, for each mutant,
# only those of them that called the mutated function).
source_of() {
    case $1 in
        queue) echo src/strato/virtio/queue.py ;;
        exit_handler) echo src/strato/vmm/exit_handler.py ;;
        vm) echo src/strato/vmm/vm.py ;;
        controller) echo src/strato/vmm/controller.py ;;
        *) echo "mutation.sh: unknown module $1 (queue exit_handler vm controller)" >&2; return 2 ;;
    esac
}
tests_of() {
    case $1 in
        queue) echo tests/virtio/test_virtqueue.py tests/mutation_kills/test_queue_edges.py ;;
        exit_handler)
            echo tests/vmm/test_small_guests.py tests/mutation_kills/test_exit_handler_stops.py ;;
        vm)
            echo tests/vmm/test_machine_kvm.py tests/vmm/test_guest_acpi_power.py \
                tests/api/test_controller.py tests/mutation_kills/test_vm_state_machine.py ;;
        controller)
            echo tests/api/test_controller.py tests/mutation_kills/test_controller_actions.py ;;
    esac
}

snapshot() {  # $1: an empty directory to fill with src, tests, guest (the built-in guest) and pyproject.toml
    if [ $head = 1 ]; then
        git -C "$root" archive HEAD src tests guest pyproject.toml | tar -x -C "$1"
        # The kill tests as they are in the work tree (they may be newer than the commit).
        rm -rf "$1/tests/mutation_kills"
        cp -r "$root/tests/mutation_kills" "$1/tests/"
    else
        tar -C "$root" --exclude=__pycache__ --exclude='*.pyc' -c src tests guest pyproject.toml \
            | tar -x -C "$1"
    fi
    [ $baseline = 0 ] || rm -rf "$1/tests/mutation_kills"
}

# The snapshot's [tool.mutmut]: the shared settings from pyproject.toml, plus this module's
# file and tests.
configure() {  # $1: snapshot dir, $2: source file, $3...: test files
    local dir=$1 src=$2
    shift 2
    python3 - "$dir/pyproject.toml" "$src" "$@" <<'EOF'
import json, re, sys, tomllib
path, src, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
text = open(path, encoding="utf-8").read()
shared = tomllib.loads(text).get("tool", {}).get("mutmut", {})
shared.update(only_mutate=[src], pytest_add_cli_args_test_selection=tests)
text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
lines = [f"{k} = {json.dumps(v)}" for k, v in shared.items()]
open(path, "w", encoding="utf-8").write(text.rstrip() + "\n\n[tool.mutmut]\n" + "\n".join(lines) + "\n")
EOF
}

summary() {  # $1: module, $2: snapshot dir; prints counts and the kill rate, lists survivors
    (cd "$2" && mutmut export-cicd-stats >/dev/null 2>&1 || true)
    python3 - "$1" "$2/mutants/mutmut-cicd-stats.json" <<'EOF'
import json, sys
name, path = sys.argv[1], sys.argv[2]
try:
    s = json.load(open(path))
except OSError:
    print(f"{name}: no results (the run did not get to the mutants)")
    raise SystemExit(0)
# A timeout counts as killed (the mutant hung the tests), a mutant no test reaches ("no tests")
# as survived; "not checked" are the mutants a capped run did not get to.
done = s["killed"] + s["survived"] + s["timeout"] + s["suspicious"] + s["segfault"]
caught = done - s["survived"]
scored = done + s["no_tests"]
rate = 100.0 * caught / scored if scored else 0.0
print(
    f"{name}: {s['total']} mutants, killed {s['killed']}, timeout {s['timeout']}, "
    f"survived {s['survived']}, no tests {s['no_tests']}, "
    f"not checked {s['total'] - scored - s['skipped']}: kill rate {rate:.1f}% ({caught}/{scored})"
)
EOF
    (cd "$2" && mutmut results 2>/dev/null | grep -E ': (survived|no tests)$' || true)
}

mkdir -p "$out"
for m in "${modules[@]}"; do
    src=$(source_of "$m")
    tag=$m$([ $baseline = 1 ] && echo -baseline || true)
    dir=$out/$tag
    rm -rf "$dir"
    mkdir -p "$dir"
    snapshot "$dir"
    tests=()
    for t in $(tests_of "$m"); do [ -e "$dir/$t" ] && tests+=("$t"); done
    configure "$dir" "$src" "${tests[@]}"
    echo "== $m: mutating $src with ${tests[*]} (cap ${cap}s) in $dir"
    start=$(date +%s)
    (cd "$dir" && nice -n 19 timeout --signal=INT --kill-after=30 "$cap" \
        mutmut run --max-children "$jobs" >"$dir/run.log" 2>&1) \
        || echo "$m: mutmut ended with status $? (124: capped at ${cap}s); see $dir/run.log"
    echo "$m: $(($(date +%s) - start)) s"
    summary "$m" "$dir" | tee "$dir/summary.txt" || true
done
