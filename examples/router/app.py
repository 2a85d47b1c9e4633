"""An example model router: FastAPI in front of two fake ranking models, using abstream's
client library (streams/client.py).

- GET /predict?user=U: the user's sticky variant of ``ranker-demo`` picks the model; the
  exposure is published once per user, the prediction every time. Users on control also run
  a shadow model (v3) beside the champion on 50% of requests; its answer is never served.
- GET /click?user=U: an outcome (metric ``click``) for the user.
- GET /health: the weights now in force (kill switches and allocations applied) and the
  publisher's delivery counts.

Run it as examples/router/README.md says. Settings come from ``ABSTREAM_*`` variables.
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import FastAPI, HTTPException, Query

from streams.client import ModelRef, Router, UnknownExperiment
from streams.settings import Settings

EXPERIMENT = "ranker-demo"
SHADOW_MODEL = ModelRef("ranker", "v3-shadow")


async def ranker_v1(user: str) -> float:
    await asyncio.sleep(random.uniform(0.005, 0.02))
    return round(random.Random(f"v1:{user}").random(), 4)


async def ranker_v2(user: str) -> float:
    await asyncio.sleep(random.uniform(0.005, 0.03))
    return round(random.Random(f"v2:{user}").random() * 0.9 + 0.1, 4)


async def ranker_v3(user: str) -> float:
    # Slow and flaky: the shadow helper's timeout and error handling keep it off the answer's path.
    await asyncio.sleep(random.uniform(0.01, 0.4))
    if random.random() < 0.05:
        raise RuntimeError("v3 failed")
    return round(random.Random(f"v3:{user}").random(), 4)


MODELS = {"control": ranker_v1, "challenger": ranker_v2}


@asynccontextmanager
async def lifespan(app: FastAPI):
    # Router.start() blocks until the control topics are read to their end: off the loop.
    router = await asyncio.to_thread(Router(Settings.from_env()).start)
    app.state.router = router
    app.state.shadow = router.shadow_runner(sample_rate=0.5, timeout_s=0.2)
    try:
        yield
    finally:
        await app.state.shadow.drain(2.0)
        await asyncio.to_thread(router.close)


app = FastAPI(title="abstream example router", lifespan=lifespan)


@app.get("/predict")
async def predict(user: str = Query(..., min_length=1, max_length=256)) -> dict:
    router: Router = app.state.router
    try:
        variant = router.variant_for(EXPERIMENT, user)
    except UnknownExperiment as exc:
        raise HTTPException(503, str(exc)) from None
    request_id = str(uuid.uuid4())
    model = router.model_of(EXPERIMENT, variant)
    started = time.perf_counter()
    status, score = "ok", None
    try:
        if variant == "control":
            score = await app.state.shadow.run(
                lambda: ranker_v1(user), lambda: ranker_v3(user), experiment_id=EXPERIMENT, unit_id=user,
                request_id=request_id, champion_model=model, challenger_model=SHADOW_MODEL)
        else:
            score = await MODELS[variant](user)
    except Exception:
        status = "error"
        raise HTTPException(502, f"model {model.name} {model.version} failed") from None
    finally:
        router.record_prediction(EXPERIMENT, user, request_id=request_id, variant=variant, score=score,
                                 latency_ms=(time.perf_counter() - started) * 1000.0, status=status)
    return {"user": user, "variant": variant, "model": f"{model.name}:{model.version}", "score": score,
            "request_id": request_id}


@app.get("/click")
async def click(user: str = Query(..., min_length=1, max_length=256), request_id: str | None = None) -> dict:
    app.state.router.record_outcome(EXPERIMENT, user, "click", 1.0, request_id=request_id)
    return {"user": user, "recorded": "click"}


@app.get("/health")
async def health() -> dict:
    router: Router = app.state.router
    try:
        weights = router.weights(EXPERIMENT)
    except UnknownExperiment:
        weights = None
    return {"experiment": EXPERIMENT, "weights": weights, "publisher": asdict(router.publisher.stats()),
            "shadow": {"published": app.state.shadow.published, "not_published": app.state.shadow.not_published}}
