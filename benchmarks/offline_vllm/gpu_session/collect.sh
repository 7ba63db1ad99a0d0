#!/bin/bash
# GPU machine: wait (arg: seconds, or until the pipeline is done), then pack /tmp/res into $OUT and show where it stands.
deadline=$(( $(date +%s) + ${1:-0} ))
while [ "$(date +%s)" -lt "$deadline" ] && ! grep -q "pipeline done" /tmp/res/status.txt 2>/dev/null; do sleep 10; done
tar czf "$OUT/res.tgz" -C /tmp res 2>/dev/null
cat /tmp/res/status.txt; tail -n 12 /tmp/res/monitor.txt
for f in /tmp/res/*.log; do echo "== $f"; grep -vE "^(INFO|DEBUG|\(EngineCore|\(Worker|WARNING)" "$f" | tail -n 6 | cut -c1-300; done
