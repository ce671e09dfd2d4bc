"""The `fast` recipe: the best CIFAR-10 test accuracy in 10 minutes of training on a 2-core CPU.

Budget: 10 minutes of wall-clock in `train_and_evaluate` (compilation and the final test
evaluation included; the one-time JPEG decode, cached afterwards, excluded) on 2 CPU cores, bf16
compute (float32 parameters and optimizer), JAX 0.10.2 on CPU.

    python experiments/cifar10.py --data-dir /work/data --recipe fast

Measured (2-core AMD EPYC (Zen 5, AVX-512 with bf16 instructions), jax 0.10.2, CIFAR-10 JPEG
copy, n=1, seed 0, `--recipe fast --no-progress`, plus the flags named):
  2026-12-05, session 30 (the recipe now: 15 epochs, was 14; the same net, its step faster):
    The recipe (`--recipe fast` alone, commit 1ca20a8, 23:17-23:46 UTC): seed 0 **91.16% test**
      (558.2 s of training at 1,350 img/s, epochs 1,315-1,416; 576.7 s in train_and_evaluate;
      9.7 min for the whole command); seed 1 90.94% (532.5 / 550.9 s, 1,415 img/s, epochs
      1,382-1,476); seed 2 90.82% (537.4 / 555.8 s, 1,405 img/s, epochs 1,333-1,460).
      Session 29's recipe (14 epochs) on the same seeds: 90.59%, 90.98%, 90.81% (mean 90.79%;
      now 90.97%, +0.18 points).
    What bought the epoch: fastnet's max-pools run on oneDNN's pooling kernels (jaxcnn/pool.py;
      forward writes each window's argmax, backward scatters through it), in place of XLA
      fusions that ran through bf16 converts. In the training loop (`--recipe fast --epochs 2`,
      `JAXCNN_DNNL_POOL=1`/`0` alternated, two runs each): 1,242-1,316 -> 1,371-1,406 img/s
      (+9%); the benchmark's bf16 step at batch 256, one process, alternated: 1,239 -> 1,289.
      Values are the same up to where a window holds NaNs (jaxcnn/pool.py).
  2026-12-05, session 29 (14 epochs, was 13; the same net, its step faster):
    The recipe (`--recipe fast` alone, commit bdd312c, 21:02-21:32 UTC): seed 0 **90.59% test**
      (560.2 s of training at 1,261 img/s, epochs 1,217-1,276; 575.6 s in train_and_evaluate;
      9.7 min for the whole command); seed 1 90.98% (563.5 / 578.2 s, 1,254 img/s, epochs
      1,217-1,321); seed 2 90.81% (556.6 / 572.0 s, 1,265 img/s, epochs 1,229-1,299).
      Session 28's recipe (13 epochs) on the same seeds: 90.47%, 90.34%, 90.67% (mean 90.49%;
      now 90.79%, +0.30 points).
    What bought the epoch: fastnet's step, not the recipe. Its BatchNorm-ReLUs are now fused
      (`norm_relu`: oneDNN's BatchNorm with the ReLU in bf16, the mask recomputed in the
      backward pass), and the 2x2 max-pool's backward no longer crops x to whole windows and
      slices each tap out of the crop (jaxcnn/ops.py `_max_pool_fwd`). The bf16 train step at
      batch 256, both versions in one process, timed alternately: 997 -> 1,237 img/s (+24%); in
      the training loop (`--recipe fast --epochs 2`, the two commits alternated, 2 runs each):
      1,089-1,173 -> 1,249-1,277 img/s (+10%), as the recipe's own step does (in one process,
      alternated: 1,045 -> 1,172 img/s, +12%; why it gains less than the bare step is open).
      Training values are unchanged up to bf16 rounding (the pool is exact): on the validation
      split below, 90.50% (test 90.46%) against 90.56% (90.39%) before.
    Tried on the 5,000-image validation split (`--val-fraction 0.1`, 13 epochs, seed 0; val
    accuracy, test in brackets; the recipe 90.56% (90.39%) before the fusion, 90.50% (90.46%) after):
      - airbench's optimizer, matched per image (`--momentum 0.85 --learning-rate 0.375
        --weight-decay 1.33e-3 --freeze-norm-scales --bias-lr-scale 64`): 90.24% (90.21%);
      - airbench's stem (`--model-kwargs stem_norm=False`: a bias, no BatchNorm): 90.22% (90.17%);
      - airbench's pair (`--model-kwargs bn_momentum=0.6 --lookahead 5`; Flax's 0.6 is its
        0.4): 90.42% (90.30%).
    None gained; none adopted.
  2026-12-05, session 28 (fastnet is airbench94's net, a 2x2 unpadded whitening
  stem and groups of 64/256/256 channels (1.97M parameters, was a 3x3 stem and 32/64/128,
  0.30M), 13 epochs (was 26)):
    The recipe (`--recipe fast` alone, commit 1576d97, 18:13-18:43 UTC): seed 0 **90.47% test**
      (549.8 s of training at 1,192 img/s, epochs 1,164-1,227; 565.5 s in train_and_evaluate;
      9.5 min for the whole command); seed 1 90.34% (551.2 / 566.3 s, 1,181 img/s);
      seed 2 90.67% (560.4 / 575.5 s, 1,172 img/s, slowest epoch 1,124). Session 27's recipe on
      the same seeds: 89.19%, 88.65%, 88.89% (mean 88.91%; now 90.49%, +1.58 points).
    Chosen on a 5,000-image validation split (`--val-fraction 0.1`, the epochs that take the
      same ~500 s of training at each net's rate; val accuracy, test in brackets, not used):
      | net (all with the frozen whitening stem)        | img/s | epochs | seed 0          | seed 1          |
      |-------------------------------------------------|-------|--------|-----------------|-----------------|
      | 3x3 stem, 32/64/128 (session 27's recipe)       | 2,440 | 27     | 88.64% (88.82%) | 89.96% (88.54%) |
      | 2x2 stem, 32/64/128                             | 2,900 | 27     | 88.40% (88.50%) | 89.88% (88.37%) |
      | 2x2 stem, 32/64/128                             | 2,900 | 32     | 88.68% (88.81%) | 90.12% (88.74%) |
      | 2x2 stem, 48/192/192                            | 1,600 | 18     | 90.46% (90.37%) |                 |
      | 2x2 stem, 64/256/256 (airbench94's; the recipe) | 1,205 | 13     | **90.56%** (90.39%) | **91.44%** (90.32%) |
    The rates are medians of 2-4 epochs of `--epochs 2` or `4` runs in the same hour (session
    27's net: 2,390-2,555 img/s; the 2x2 stem on it: 2,750-3,022). Also measured for rate, two
    epochs each: 96/384/384 626 img/s (6-7 epochs in the budget); 64/256/256 with GELU (airbench's
    activation) 940 img/s, 83.96% test after 2 epochs against ReLU's 83.15%: 22% fewer epochs
    for it; 64/256/256 with the 3x3 stem 938 img/s. `--lookahead 5` on the wide net (seed 0):
    val 90.46% (90.72%), against 90.56% without: not adopted. The 2x2 stem is 1.19x the small net's rate
    and 1.28x the wide net's. The note that had kept the net small (fastnet.py: "airbench94 ...
    ~1/6 the images/s") does not hold now: measured, it is 1/2.4 of the small net's.
  2026-12-05, session 27 (the first convolution a frozen patch-whitening filter bank,
  `whiten_stem='frozen'`):
    The recipe (`--recipe fast` alone, 15:03-15:21 UTC): seed 0 **89.19% test** (515.3 s of
      training at 2,567 img/s, epochs 2,252-2,850; 529.1 s in train_and_evaluate; 8.9 min for
      the whole command); seed 1 88.65% (522.8 s at 2,589 img/s, 536.5 s in the budget).
      Against session 26's recipe: 88.79% and 88.87% (+0.40, -0.22 points). Seed 2, the two
      recipes one after the other: 88.60% (session 26's, `--whiten-stem off`) and 88.89% (the
      recipe: 540.1 s of training at 2,462 img/s, 553.9 s in the budget): +0.29. Means over the
      three seeds: 88.91% against 88.75%.
    Chosen on a 5,000-image validation split (`--val-fraction 0.1 --epochs 27`, val accuracy;
    test accuracy in brackets, not used for the choice):
      | run                               | seed 0          | seed 1          |
      |-----------------------------------|-----------------|-----------------|
      | the recipe of session 26          | 88.34% (88.53%) | 89.08% (88.32%) |
      | `--whiten-stem frozen`            | 88.64% (88.82%) | 89.96% (88.54%) |
      | `--whiten-stem init` (trained)    | 88.72% (88.55%) |                 |
      | frozen + `--lookahead 5`          | 88.60% (88.39%) |                 |
      | frozen + `--freeze-norm-scales --bias-lr-scale 64` | 88.44% (88.51%) |  |
    'frozen' and 'init' are within 0.1 point on the one split both ran; the recipe takes
    'frozen', airbench's choice (the filters stay as computed). airbench's
    lookahead gained nothing here (train accuracy 94.1% against 93.9%, val 88.60% against
    88.64%) and stays an option (`--lookahead 5`), not the recipe.
  2026-12-05, session 26 (the recipe now: 26 epochs, the test set evaluated once at the end,
  airbench's alternating flip and 6-view test-time augmentation):
    The recipe (`--recipe fast` alone, 12:22-12:32 UTC): **88.79% test**, 529.9 s of training
      at 2,470 img/s (epochs 2,183-2,826), 543.9 s in train_and_evaluate, 9 min 8 s for the
      whole command; +0.48 points over the 25-epoch recipe of 2026-12-04 (88.31%).
    The same with 27 epochs: 88.92% test, 600.8 s of training at 2,248 img/s, 613.9 s in
      train_and_evaluate: over the budget at that hour's rate (the VM ran 2,250-2,520 img/s
      that hour), so the recipe keeps 26.
    What each change bought, on the same seed:
      - `--eval-every 0` (no per-epoch test pass): the 25-epoch recipe ran 522.6 s in
        train_and_evaluate at 2,522 img/s, 508.7 s of it training, against 505 / 564 s with a
        test pass per epoch (2026-12-04): ~45 s, two more epochs. Training is unchanged: the
        same model (88.31% with flip-TTA, to the image).
      - `tta_translate=1` (airbench's level 2: the image and its mirror, plus both shifted 1 px
        up-left and down-right at half weight), chosen on a 5,000-image validation split
        (`--val-fraction 0.1 --epochs 27`, the same model evaluated each way, val accuracy):
        flip-TTA 88.02% -> 88.34% (shift 2: 88.18%); a second such run (with
        `--bias-lr-scale 64`): 88.30% -> 88.54% (shift 2: 88.50%). On the test set, the
        25-epoch model above: 87.10% plain, 88.31% flip, 88.40% shift 1, 88.63% shift 2.
      - alternating flip: adopted from airbench (their paper measures it better than random
        flips wherever flipping helps). Checked after the choice, on the test set, against the
        recipe with `--no-alternate-flip`: seed 0 88.79% / 88.71%, seed 1 88.87% / 88.72%.
    Seed 1 (`--seed 1`): the recipe 88.87% (570.2 s in the budget at 2,389 img/s), the recipe
      before this session 88.46% (616.2 s at 2,285 img/s: over the budget at that hour's rate).
    Tried, not adopted: `--bias-lr-scale 64` (airbench's BatchNorm-bias learning rate, with
      this net's BatchNorm scales still trained): val 88.54% against 88.34% and test 88.57%
      against 88.53% on the validation-split runs above, within a single run's noise.
  2026-12-04, bf16 (commit 860bb29, where the recipe was still fp32 with 15 epochs):
    epochs=25 (the recipe until session 26): 88.31% test (flip-TTA), 505 s of training at
      2,517 img/s, 564 s in train_and_evaluate, 568 s (9.5 min) for the whole command
      (`--precision bf16 --epochs 25`; the VM ran 19.6-25.2 s per epoch).
    The recipe as it then stood, `--recipe fast` alone at 7030f57, half an hour later: the same
      88.31% (same test accuracy to the image), 454 s of training at 2,796 img/s, 506 s in
      train_and_evaluate, 8.5 min for the whole command.
    epochs=20: 87.96%, 380 s of training at 2,683 img/s, 425 s in train_and_evaluate, 7.1 min.
    One epoch each, minutes apart: bf16 2,597 img/s, fp32 1,860 img/s (71.2% / 71.1% test): bf16
      is what bought the ten extra epochs. The bare train step at batch 256, alternated
      processes: fp32 134 and 136 ms, bf16 100 and 89 ms. On a CPU without AVX-512 BF16 or AMX,
      bf16 is emulated and slower: pass `--precision fp32` and the epochs the formula below
      gives.
  2026-11-24, fp32, oneDNN convolutions and the tiled max-pool gradient (commit ff69cee):
    epochs=15 (the recipe until 2026-12-04): 87.40% test (flip-TTA), 474 s of training at
      1,632 img/s, 531 s in train_and_evaluate, 8 min 54 s for the whole command
      (`--recipe fast --epochs 15`).
    epochs=11 at 8440f6f (oneDNN only): 86.67%, 373 s at 1,499 img/s, 7 min 0 s.
  2026-11-23, huge pages on (jaxcnn/_malloc.py):
    epochs=11 (the recipe): 86.98% test (flip-TTA), 457 s of training at 1,211 img/s, 532 s in
      train_and_evaluate, 8 min 56 s for the whole command (first-time JPEG decode included).
    epochs=12: 86.88%, 491 s at 1,237 img/s, 9 min 25 s: fits the budget, buys nothing.
  Before huge pages: epochs=11 86.98% (the same run, bit for bit: 509 s at 1,101 img/s,
  9 min 35 s); epochs=6 84.97% in 5 min 23 s.
  Earlier, on a 2-core Xeon with the jaxcnn.ops kernels not yet written (~700 img/s, load ~2):
  epochs=4 83.45% in 6 min 24 s; epochs=6 84.92% in 9 min 9 s.
`epochs` is what adapts the recipe to another machine:
  epochs = floor((600 s - 20 s) * img/s / 50,000)
where img/s is the slowest training rate the progress bar shows on that machine, 20 s covers
compilation and the final 6-view test evaluation (13-16 s measured), and 50,000 is the training
images of one epoch. For airbench94's net with session 29's faster step, at the slowest epoch
rate seen in session 30 (1,315 img/s) it gives 15, the recipe's value (session 29's step: 1,217
img/s, 14; session 28's: 1,124 img/s, 13). For session 27's smaller net, at the
slowest rate seen (2,248 img/s), it gave 26. Before session 26 the recipe evaluated the test set after
every epoch and the formula was floor(0.9 * 600 s * img/s / 56,000) (25 at 2,517 img/s).
Nothing is selected on the test set: there is no validation split and no best-epoch choice
(keep_best=False); the figure is the last epoch's. The settings chosen in session 26 were chosen
on a validation split or taken from airbench.

Short runs (the full one-cycle schedule squeezed into 240 steps = 61k images; the 2-core Xeon
shared with other jobs, load 4-6 on the 2 cores, 140-200 img/s, 5.5-7 min each):
  lr 0.2, this net                      70.2% test (71.3% flip-TTA)
  lr 0.2, 64/128/256 on a 2x2/2 stem    69.4% (70.5%), 4x the parameters, no faster
  lr 0.4, this net (the recipe)         73.1% (74.0%)
  lr 0.2 + EMA 0.99                     65.3% (the loop's EMA, see below)

Borrowed:
  * airbench (Keller Jordan, 2024; from hlb-CIFAR10): the network (see
    jaxcnn/models/fastnet.py: conv -> pool -> BN -> act -> conv -> BN -> act groups, global
    max-pool, logits x1/9, dirac/identity init), label smoothing 0.2, Nesterov SGD,
    a short warm-up then a long decay, small translations (2 px reflect) plus flips,
    training on all 50,000 images with uint8 data augmented inside the jitted step.
  * David Page, "How to train your ResNet" (2018, ResNet-9 / DAWNBench): Nesterov momentum 0.9,
    weight decay 5e-4, a one-cycle schedule peaking about a quarter of the way in, batch 512 ->
    256 here, ReLU. The lr is twice Page's per-image rate (0.4 at batch 256; airbench uses 0.375
    with momentum 0.85): a run this short wants it (+2.9 points over 0.2 above).
Borrowed later: flip test-time augmentation (+0.9 to +1.1 points in the short runs); in session
26 airbench's alternating flip and its level-2 test-time augmentation (1 px shifted views), and
its per-epoch-evaluation-free timing (airbench evaluates once, at the end).
Borrowed in session 27: the patch-whitening first layer, frozen (airbench's `init_whiten`: the
first convolution's 24 filters are +/- the 12 leading eigenvectors of the 3x3 patch covariance of
5,000 training images over sqrt(eigenvalue + 5e-4); they carry 99.87% of the patches' variance;
airbench whitens 2x2 patches, all 12 directions).
Borrowed in session 28: the rest of airbench94's network, its widths (64/256/256) and its 2x2
unpadded whitening stem, which whitens all 12 directions of a 2x2 patch; GELU was measured and
not taken (above).
Tried, not adopted (session 27, above): lookahead; frozen BatchNorm scales with 64x their
biases' learning rate (airbench's pair; train accuracy 92.5% against 93.9%: this narrower net
underfits without its BatchNorm gains). airbench's 64x learning rate on BatchNorm biases is available
(`--bias-lr-scale 64`) but gained nothing measurable here (above). EMA is off: at 0.99 it cost
5 points in a 240-step run, measured before the loop's EMA got its warm-up
(jaxcnn/train/step.py); not re-measured since.
"""
from __future__ import annotations

FAST_MODEL = "fastnet"

FAST_RECIPE = dict(
    model=FAST_MODEL,
    model_kwargs={},             # fastnet's defaults: airbench94's net (2x2 stem 24, 64/256/256), ReLU
    # All 50,000 images train, as in the published runs; nothing is selected on the test set.
    val_fraction=0.0,
    keep_best=False,
    epochs=15,                   # fits 600 s at the slowest epoch rate seen (see above)
    batch_size=256,              # per-image cost is no lower at 512 on 2 cores; more updates/epoch
    optimizer="sgd",
    nesterov=True,
    momentum=0.9,
    learning_rate=0.4,           # 2x Page's per-image rate (airbench: 0.375 at batch 256, momentum 0.85)
    weight_decay=5e-4,           # L2 on kernels only
    schedule="onecycle",
    onecycle_pct=0.25,           # airbench peaks at 23%, Page at 5/24 epochs
    label_smoothing=0.2,
    tta_flip=True,               # +0.9 to +1.1 points in the short runs below
    tta_translate=1,             # airbench's level 2: +1 px shifted views (+0.32 on a val split)
    eval_every=0,                # test set once, at the end: per-epoch passes cost ~10% of the budget
    ema_decay=0.0,
    whiten_stem="frozen",        # airbench's patch-whitening first layer (+0.30, +0.88 on val splits)
    crop_padding=2,              # airbench: translate by up to 2 px (reflect padding)
    flip=True,
    alternate_flip=True,         # airbench's derandomised flip
    precision="bf16",            # 1.4x fp32's img/s on the AVX-512 EPYC (oneDNN's bf16 kernels)
)

FAST_SOURCE = "airbench (Jordan 2024) + Page's ResNet-9 (2018), sized for a 2-core CPU"
