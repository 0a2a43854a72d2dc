#!/usr/bin/env bash
# Mutation testing of the pure cores with mutmut 3 (not in CI: minutes per module on 2 cores).
#
#   bash scripts/mutants.sh                   # every module below
#   bash scripts/mutants.sh contracts drift   # only these
#   MUTANTS_RERUN=1 bash scripts/mutants.sh render  # re-test only the last run's survivors
#                                             # against the current tests (no source changed
#                                             # since that run, the module's or any other:
#                                             # else mutmut cannot collect stats; run in full)
#
# mutmut wants one importable source tree, while this repository maps three directories into
# the `packetflow` package. So each module is staged in build/mutants/<module>/: src/packetflow
# is runtime/packetflow with operator/ and v1/ added, beside copies of tests/, examples/, crds/
# and charts/, and mutmut runs there with only the tests relevant to that module. The venv's
# editable install stays in place (its finder comes after sys.path, so the staged copy wins).
# Prints one line per module: killed/total (timeouts count as killed), then the survivors.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-$root/.venv/bin/python}
jobs=${MUTANTS_JOBS:-2}

"$python" -c 'import mutmut' 2>/dev/null || "$python" -m pip install -q 'mutmut>=3.8,<4'

# module -> the source file (under src/packetflow) and the tests that exercise it
declare -A source=(
  [contracts]=contracts.py
  [check]=composition/check.py
  [executor]=composition/executor.py
  [store]=actors/store.py
  [render]=operator/render.py
  [status]=operator/status.py
  [drift]=operator/drift.py
  [decide]=operator/routing/decide.py
  [trust]=federation/trust.py
  [search]=planner/search.py
)
declare -A tests=(
  [contracts]="tests/unit/test_contracts.py tests/unit/test_engine.py tests/unit/test_contracts_mutants.py"
  [check]="tests/unit/test_composition.py"
  [executor]="tests/unit/test_composition_executor.py tests/unit/test_retry_backoff.py tests/unit/test_composition.py tests/unit/test_executor_mutants.py"
  [store]="tests/unit/test_actors_store.py tests/unit/test_store_mutants.py"
  [render]="tests/operator/test_operator_pure.py tests/operator/test_operator_render.py tests/operator/test_actor_render.py tests/operator/test_canary.py tests/operator/test_network_policy.py tests/operator/test_workload_identity.py tests/operator/test_federation_render.py tests/operator/test_service_account_tokens.py tests/operator/test_authority.py tests/operator/test_federation_identity.py tests/unit/test_render_mutants.py"
  [status]="tests/operator/test_operator_pure.py tests/operator/test_operator_render.py tests/operator/test_actor_render.py tests/unit/test_status_mutants.py"
  [drift]="tests/operator/test_operator_pure.py tests/operator/test_operator_render.py tests/operator/test_actor_render.py"
  [decide]="tests/unit/test_routing_decide.py tests/unit/test_routing_recommend.py tests/unit/test_routing_decide_mutants.py"
  [trust]="tests/unit/test_federation_pure.py"
  [search]="tests/unit/test_planner_search.py tests/unit/test_planner.py"
)
# Which tests of a module's files run (pytest -k): for compositions not those on a PostgreSQL
# server (a fresh one per forked mutant is too slow), nor the engine-level tests that wait out
# real timeouts or reach check.py only through loading (seconds per mutant); for the planner's
# search its own unit tests and the planner test that calls it directly, not the planners over
# an engine (seconds per mutant); for render not the tests running the operator on the emulator.
declare -A keep=(
  [check]="(check or bad_composition or parses or shadow or cycle or trigger_is_rejected) and not postgres"
  [executor]="not (branch_timeout or scheduled or callers_deadline or trigger or sqlite_keys or postgres)"
  [search]="search"
  [render]="not (the_operator_runs or the_operator_applies or the_operator_issues)"
)
# Lines not mutated: SQL text (keywords and unquoted names are case-insensitive in SQLite and
# PostgreSQL, so its case mutants are equivalent; what each statement does is tested).
declare -A skip=(
  [store]='"[^"]*([?]|\b(SELECT|INSERT|UPDATE|DELETE|WHERE|VALUES|CONFLICT|RETURNING|AND)\b)'
)
order=(contracts check executor store render status drift decide trust search)
modules=("$@")
[ ${#modules[@]} -gt 0 ] || modules=("${order[@]}")

for module in "${modules[@]}"; do
  [ -n "${source[$module]:-}" ] || { echo "unknown module '$module' (one of: ${order[*]})" >&2; exit 2; }
  stage=$root/build/mutants/$module
  selection=""
  for t in ${tests[$module]}; do [ -e "$t" ] && selection+="\"$t\", "; done
  file=${source[$module]}
  # The -k selection as TOML list items (built here: quotes inside ${x:+...} in a heredoc
  # come out bare, which is not TOML).
  select_k=""
  [ -z "${keep[$module]:-}" ] || select_k=", \"-k\", \"${keep[$module]}\""
  case $file in operator/*) original=operator/packetflow/$file ;; *) original=runtime/packetflow/$file ;; esac
  if [ -n "${MUTANTS_RERUN:-}" ] && [ -f "$stage/results.txt" ] && cmp -s "$original" "$stage/src/packetflow/$file"; then
    # Only the mutants the last run left alive, against the current tests (same source).
    for dir in "$stage" "$stage/mutants"; do rm -rf "$dir/tests"; cp -r tests "$dir/"; done
    sed -i -e "s|^pytest_add_cli_args_test_selection = .*|pytest_add_cli_args_test_selection = [${selection}]|" \
      -e "s|^pytest_add_cli_args = .*|pytest_add_cli_args = [\"-p\", \"no:cacheprovider\", \"-q\"${select_k}]|" \
      "$stage/pyproject.toml"
    cp "$stage/results.txt" "$stage/previous.txt"
    alive=$(grep -v ": killed\|: timeout" "$stage/results.txt" | sed 's/: .*//' | tr -d ' ')
    if [ -n "$alive" ]; then
      # shellcheck disable=SC2086 # one argument per mutant name
      (cd "$stage" && nice -n 10 "$python" -m mutmut run --max-children "$jobs" $alive >"$stage/rerun.log" 2>&1) || {
        echo "$module: mutmut failed, see $stage/rerun.log" >&2; continue; }
    fi
  else
  rm -rf "$stage"
  mkdir -p "$stage/src"
  cp -r runtime/packetflow "$stage/src/packetflow"
  cp -r operator/packetflow/operator "$stage/src/packetflow/operator"
  cp -r proto/packetflow/v1 "$stage/src/packetflow/v1"
  cp -r tests examples crds charts bench "$stage/"
  find "$stage" -name __pycache__ -prune -exec rm -rf {} +
  # The project's pytest settings plus mutmut's own section for this module.
  cp pyproject.toml "$stage/pyproject.toml"
  cat >>"$stage/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["src/packetflow"]
only_mutate = ["src/packetflow/${source[$module]}"]
pytest_add_cli_args_test_selection = [${selection}]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"${select_k}]
also_copy = ["examples", "crds", "charts", "bench"]
process_isolation = "forkserver"
do_not_mutate_patterns = [${skip[$module]:+'${skip[$module]}'}]
EOF
  (cd "$stage" && nice -n 10 "$python" -m mutmut run --max-children "$jobs" >"$stage/run.log" 2>&1) || {
    echo "$module: mutmut failed, see $stage/run.log" >&2; tail -c 2000 "$stage/run.log" >&2; continue; }
  fi
  (cd "$stage" && "$python" -m mutmut results --all true >"$stage/results.txt" 2>&1) || true
  "$python" - "$module" "$stage/results.txt" "$(ls "$stage/previous.txt" 2>/dev/null)" <<'EOF'
import sys
module, path, previous = sys.argv[1], sys.argv[2], sys.argv[3]


def read(path):
    outcomes = {}
    for line in open(path):
        name, _, outcome = line.strip().rpartition(": ")
        if name:
            outcomes[name] = outcome
    return outcomes


outcomes = read(path)
if previous:  # a rerun tested only the survivors: the others keep their last verdict
    before = read(previous)
    outcomes = {name: before.get(name, outcome) if outcome == "not checked" else outcome
                for name, outcome in outcomes.items()}
killed = sum(o in ("killed", "timeout") for o in outcomes.values())
print(f"{module}: {killed}/{len(outcomes)} killed ({100 * killed / max(len(outcomes), 1):.0f}%)")
for name, outcome in sorted(outcomes.items()):
    if outcome not in ("killed", "timeout"):
        print(f"  {outcome}: {name}")
EOF
done
