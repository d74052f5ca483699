# Shared by the experiment drivers (source it after setting ROOT and COMMON):
#   go NAME ARGS...  runs `softlm train $COMMON --out $ROOT/NAME ARGS` once (a NAME/done file marks it
#   finished; a rerun skips it), logs to $ROOT/NAME.log with /usr/bin/time -v, prints its ppl figures.
go() {
  local out=$ROOT/$1; shift
  if [ -f $out/done ]; then echo "$out done"; return; fi
  mkdir -p $out; echo "== $out $* $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  /usr/bin/time -v softlm train $COMMON --out $out "$@" > $out.log 2>&1 && touch $out/done
  echo "== $out rc=$? $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; grep -ho '"ppl": [0-9.]*' $out/*/results.json | tail -2
}
