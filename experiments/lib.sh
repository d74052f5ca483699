# Shared by the experiment drivers (source it after setting ROOT; go reads COMMON when it runs):
#   go NAME ARGS...  runs `softlm train $COMMON --out $ROOT/NAME ARGS` once (a NAME/done file marks it
#   finished; a rerun skips it), logs to $ROOT/NAME.log with /usr/bin/time -v, prints its ppl figures.
#   cmp NAME ARGS... runs `softlm compress` of SmolLM2 on WikiText-2 (ARGS: --cr and the rest) to $ROOT/NAME
#   once (its compact file marks it finished), logged to $ROOT/NAME.log with /usr/bin/time -v.
#   ev NAME          `softlm eval` of $ROOT/NAME's allocated compact file, once (kept in $ROOT/NAME.eval); prints it.
#   wait_pid [PID]   returns when process PID (if given) has ended: a driver queued behind another.
go() {
  local out=$ROOT/$1; shift
  if [ -f $out/done ]; then echo "$out done"; return; fi
  mkdir -p $out; echo "== $out $* $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  /usr/bin/time -v softlm train $COMMON --out $out "$@" > $out.log 2>&1 && touch $out/done
  echo "== $out rc=$? $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; grep -ho '"ppl": [0-9.]*' $out/*/results.json | tail -2
}
cmp() {
  local out=$ROOT/$1; shift
  [ -f $out/allocated/compact.safetensors ] || /usr/bin/time -v softlm compress --task wikitext --model smollm2 \
    --no-progress --out $out "$@" > $out.log 2>&1
}
ev() {
  [ -s $ROOT/$1.eval ] || softlm eval $ROOT/$1/allocated/compact.safetensors --task wikitext 2>&1 | tr '\r' '\n' \
    | grep 'test: ppl' > $ROOT/$1.eval
  echo "== $1 $(cat $ROOT/$1.eval) $(date +%T)"
}
wait_pid() { [ -z "$1" ] || while kill -0 $1 2>/dev/null; do sleep 20; done; }
