"""The API's contract and its pages: the response and error models FastAPI documents in
/openapi.json, each endpoint's request bodies and error statuses, the upload page at / and the
Swagger UI assets the replica serves itself (no CDN).

(No `from __future__ import annotations` here: FastAPI must see real types.)
"""
from typing import Any, Literal

from pydantic import BaseModel, Field

from .serve_limits import MAX_BATCH_FILES, MAX_FIELD_BYTES


class ErrorBody(BaseModel):
    """Every error the API answers (the proxy's own 503 under backpressure is plain text)."""
    error: str = Field(description="what is wrong, in words fit for the client")
    file: str | None = Field(description="the file it concerns (multipart filename, or 'body' for a raw body)")
    request: str = Field(description="method and path of the request")


class ModelIdentity(BaseModel):
    study: str | None
    arm: str | None
    seed: int | None = Field(description="-1 for a seed ensemble")
    checkpoint: str = Field(description="relative to the study directory (comma-separated for an ensemble)")
    spec_hash: str | None
    backbone: str
    image_size: int
    epoch: int
    members: int = Field(description="models averaged (1, or the seeds of an ensemble)")


class Prediction(BaseModel):
    probability: float = Field(ge=0, le=1, description="P(pneumonia)")
    label: Literal["NORMAL", "PNEUMONIA"]
    label_index: Literal[0, 1]
    threshold: float
    model: ModelIdentity


class FilePrediction(Prediction):
    file: str


class FileError(BaseModel):
    file: str
    error: str
    status: int = Field(description="the status this file alone would have got")


class BatchResult(BaseModel):
    results: list[FilePrediction | FileError] = Field(description="one per file, in request order")


class Preprocessing(BaseModel):
    image_size: int
    mean: float
    std: float
    channels: int
    geometry: str


class OperatingPoint(BaseModel):
    policy: str = Field(description="youden, sensitivity, specificity or calibrated (see the README)")
    target: float | None = Field(default=None, description="the sensitivity or specificity aimed at")
    site: str | None = Field(default=None, description="the site profile, when one is served")
    prevalence: float | None = Field(default=None, description="the site's expected prevalence the point was "
                                     "adjusted for (calibrated policy; Bayes' rule), when one was given")
    chosen_on: str = Field(description="the labelled images the threshold was chosen on")
    platt: tuple[float, float] | None = Field(default=None, description="calibration of the served probability")


class ModelInfo(BaseModel):
    model: ModelIdentity
    threshold: float
    operating_point: OperatingPoint
    preprocessing: Preprocessing
    class_names: list[str]
    test_metrics: dict[str, float | None] = Field(description="on the study's internal test split")
    external_metrics: dict[str, dict[str, float | None]] = Field(
        description="per external set (collected apart from train), when the study scored one")
    validation_metrics: dict[str, Any]
    model_card: str | None = Field(description="where GET returns the model card (null: this model has none)")


class ModelCard(BaseModel):
    """The study's model card (report/model_card.json); Accept: text/markdown gets model_card.md."""
    card_version: int
    model: dict[str, Any] = Field(description="study, arm, backbone, seed, checkpoint, threshold, operating point")
    intended_use: dict[str, Any] = Field(description="research use, not a medical device; what is out of scope")
    training_data: dict[str, Any] = Field(description="source, notes (label policy), split level, counts per split "
                                                      "and class")
    selection: dict[str, Any] = Field(description="arms, budget, seeds, selection metric, threshold policy")
    metrics: dict[str, Any] = Field(description="internal test and external metrics with 95% CIs")
    subgroups: dict[str, Any] = Field(description="per-subgroup results, or why there are none")
    limits: list[str] = Field(description="known limits, one sentence each")
    spec_hash: str


class Health(BaseModel):
    status: Literal["ok"]
    forward_ms: float
    probe: float


class Stats(BaseModel):
    batch_sizes: dict[str, int]
    images: int


BINARY = {"type": "string", "format": "binary"}
IMAGE = BINARY | {"minLength": 1}  # an empty single upload is a 400; in a batch it is that file's error
IMAGE_BODY = {"requestBody": {"required": True, "description": "one chest X-ray: a multipart file field `file`, "
                              "or the raw bytes with their content type", "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {"file": IMAGE}}},
    "image/jpeg": {"schema": IMAGE}, "image/png": {"schema": IMAGE}, "application/dicom": {"schema": IMAGE}}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": BINARY, "minItems": 1, "maxItems": MAX_BATCH_FILES}}}}}}}
RETRY_AFTER = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}


def errors(*statuses: int) -> dict:
    words = {400: "bad request: empty body or file, malformed multipart, more than one file, a Host that is not "
                  "this server's", 403: "cross-origin request not allowed", 408: "upload not received in time",
             413: f"request too large, or a non-file form field over {MAX_FIELD_BYTES // 1024} KiB",
             415: "not a JPEG, PNG or DICOM image, or content type not accepted",
             404: "not found: an unknown path, or no model card for the served model (the body says why)",
             422: "an accepted format that cannot be used: corrupt, truncated, too large, too small, implausible "
                  "shape, multi-frame, too slow to decode",
             501: "Grad-CAM is not available for this model", 503: "replica busy (retry after Retry-After seconds) "
                                                                   "or model unhealthy"}
    out = {s: {"model": ErrorBody, "description": words[s]} for s in statuses}
    if 503 in out:
        out[503] |= {"headers": RETRY_AFTER, "content": {"text/plain": {"schema": {"type": "string"}}}}
    return out


UPLOAD_ERRORS = errors(400, 403, 408, 413, 415, 422, 503)
GET_ERRORS = errors(400, 403)
CARD_RESPONSES = {200: {"model": ModelCard, "description": "the card: JSON by default, Markdown with Accept: "
                                                            "text/markdown",
                        "content": {"text/markdown": {"schema": {"type": "string"}}}},
                  **GET_ERRORS, **errors(404)}


UPLOAD_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cxr-ray</title>
<style>
body{font-family:system-ui,sans-serif;max-width:760px;margin:2rem auto;padding:0 1rem;color:#222}
#result{font-size:1.2rem;margin:1rem 0} .PNEUMONIA{color:#b3261e} .NORMAL{color:#1b6e3a}
.note{color:#666;font-size:.9rem} img{max-width:100%;image-rendering:auto;border:1px solid #ccc}
</style></head><body>
<h1>Chest X-ray pneumonia classifier</h1>
<p class="note">Research use only, not a medical device. Model: <span id="model">loading...</span>.
API: <a href="docs">docs</a></p>
<form id="form"><input type="file" id="file" name="file" accept="image/jpeg,image/png,.dcm,application/dicom">
<button type="submit">Classify</button></form>
<div id="result"></div><img id="heatmap" alt="Grad-CAM heatmap" hidden>
<script>
fetch('v1/model').then(r => r.json()).then(m => {
  document.getElementById('model').textContent =
    `${m.model.arm} (${m.model.backbone}, ${m.model.image_size}px) from study ${m.model.study}`;
});
document.getElementById('form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const file = document.getElementById('file').files[0];
  const out = document.getElementById('result'), img = document.getElementById('heatmap');
  if (!file) { out.textContent = 'Choose an image first.'; return; }
  out.textContent = 'Classifying...'; img.hidden = true;
  const body = new FormData(); body.append('file', file);
  const r = await fetch('v1/predict', {method: 'POST', body});
  const j = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) { out.textContent = `Error ${r.status}: ${j.error}`; return; }
  out.innerHTML = `<span class="${j.label}" id="label">${j.label}</span>: P(pneumonia) = ` +
    `<span id="probability">${j.probability.toFixed(3)}</span> (threshold ${j.threshold.toFixed(3)})`;
  const body2 = new FormData(); body2.append('file', file);
  const h = await fetch('v1/explain', {method: 'POST', body: body2});
  if (h.ok) { img.src = URL.createObjectURL(await h.blob()); img.hidden = false; }
});
</script></body></html>
"""

DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "favicon-32x32.png": "image/png"}
