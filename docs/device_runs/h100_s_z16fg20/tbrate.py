"""Print steps/s of DiT runs from their TensorBoard logs: median / p10 of the logged rates, and the rate
over the wall span between the first and last logged step (excludes the first step's compile)."""
import glob
import json
import sys

import numpy as np
from tensorboard.backend.event_processing import event_accumulator as ea

out = {}
for run in sys.argv[1:]:
    acc = ea.EventAccumulator(glob.glob(f"{run}/dit/tb/events*")[0]); acc.Reload()
    r = acc.Scalars("steps_per_sec"); l = acc.Scalars("loss")
    v = np.array([e.value for e in r])
    span = l[-1].wall_time - l[0].wall_time
    out[run] = {"logged": len(v), "median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
                "p90": float(np.percentile(v, 90)), "first_step": l[0].step, "last_step": l[-1].step,
                "span_s": span, "span_rate": (l[-1].step - l[0].step) / max(span, 1e-9),
                "rates": [round(float(x), 1) for x in v]}
    print(run, json.dumps({k: v for k, v in out[run].items() if k != "rates"}))
    print("  rates:", out[run]["rates"])
json.dump(out, open(sys.argv[1].rsplit("/", 1)[0] + "/ab_rates.json", "w"), indent=1)
