"""Where an image base fails: one-step denoising of training pictures vs its own sampling trajectory.

    python scripts/image_base_check.py BASE_DIR [--png OUT.png] [--json]

1) Training pictures noised to t = 100, 300, 500, 800 and denoised in one step: the MSE of the
   predicted noise (or v) against the truth and of the predicted picture x0 against the picture.
   A base that has learned its data gets these right.
2) DDIM sampling (50 steps, guidance 1) from pure noise for the same subjects: the mean of the
   predicted x0 along the way, next to the training pictures' mean (white emoji backgrounds make
   it ~0.5 in [-1, 1]). A trajectory that never reaches the data's mean draws no subject even when
   step 1 is right.
The PNG: per t, the noised pictures and their one-step x0 (two rows each), then the sampled ones.
"""

from __future__ import annotations

import argparse
import json

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from oral.image.base import ImageBase, image_grid
from oral.image.data import load_style_set


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base")
    p.add_argument("--png", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--count", type=int, default=8)
    a = p.parse_args()
    m = ImageBase.from_pretrained(a.base)
    x, names = load_style_set(m.meta["style"], m.size, "train")
    sel = torch.linspace(0, len(names) - 1, a.count).long()
    x0, subj = x[sel], [names[i] for i in sel]
    emb, mask = m.names(subj)
    sched = DDPMScheduler.from_config(m.scheduler_config)
    kind = sched.config.prediction_type
    result = {"base": a.base, "prediction_type": kind, "data_mean": round(float(x.mean()), 4), "one_step": []}
    rows, g = [], torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tt in (100, 300, 500, 800):
            noise = torch.randn(x0.shape, generator=g)
            t = torch.full((len(sel),), tt)
            xt = sched.add_noise(x0, noise, t)
            out = m.unet(xt, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample
            ab = sched.alphas_cumprod[tt]
            if kind == "v_prediction":
                target = sched.get_velocity(x0, noise, t)
                x0h = ab.sqrt() * xt - (1 - ab).sqrt() * out
            else:
                target = noise
                x0h = (xt - (1 - ab).sqrt() * out) / ab.sqrt()
            result["one_step"].append({"t": tt, "pred_mse": round(float(torch.nn.functional.mse_loss(out, target)), 4),
                                       "x0_mse": round(float(torch.nn.functional.mse_loss(x0h.clamp(-1, 1), x0)), 4)})
            rows += [xt.clamp(-1, 1), x0h.clamp(-1, 1)]
        ddim = DDIMScheduler.from_config(m.scheduler_config)
        ddim.set_timesteps(50)
        xs, trail = torch.randn(x0.shape, generator=g), []
        for i, t in enumerate(ddim.timesteps):
            out = m.unet(xs, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample
            step = ddim.step(out, t, xs)
            if i % 10 == 0:
                trail.append({"t": int(t), "x0_mean": round(float(step.pred_original_sample.mean()), 4)})
            xs = step.prev_sample
    result["sampling"] = trail + [{"t": 0, "sample_mean": round(float(xs.clamp(-1, 1).mean()), 4)}]
    rows.append(xs.clamp(-1, 1))
    for r in result["one_step"]:
        print(f"t={r['t']:>3}: one-step {kind} mse {r['pred_mse']:.4f}, x0 mse {r['x0_mse']:.4f}")
    print(f"sampling (DDIM 50, guidance 1): x0 mean along the way {[r.get('x0_mean') for r in trail]}, "
          f"samples' mean {result['sampling'][-1]['sample_mean']} (training pictures {result['data_mean']})")
    if a.png:
        with open(a.png, "wb") as f:
            f.write(image_grid(torch.cat(rows), None, columns=a.count))
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
