# Sourced by the GPU session scripts (gpu_issue12.sh, gpu_issue24.sh): `step NAME SECONDS cmd...`
# runs cmd under `timeout` with what is left of BUDGET seconds (counted from `start`), writing
# OUT/NAME.txt as it goes, and skips it when less than SECONDS are left or when STEPS (if set)
# does not name it.
step() {
  local name=$1 need=$2; shift 2
  if [ -n "${STEPS:-}" ]; then case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac; fi
  local left=$(( BUDGET - ($(date +%s) - start) ))
  if [ "$left" -lt "$need" ]; then echo "== $name: skipped ($left s left, needs $need)"; return; fi
  echo "== $name (up to $left s)"
  local t0; t0=$(date +%s)
  timeout "$left" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name: exit $?, $(( $(date +%s) - t0 )) s"
  tail -n "${TAIL:-3}" "$OUT/$name.txt"
}
