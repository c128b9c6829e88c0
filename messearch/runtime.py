"""Run an ONNX cascade (`messearch export ... --onnx DIR`) with ONNX Runtime and real early exit.

numpy and onnxruntime only (no torch): copy DIR (stage<k>.onnx + cascade.json) and this module to the device.

    from messearch.runtime import Cascade
    cascade = Cascade("DIR")
    x = cascade.preprocess(rgb)            # uint8 HxWx3 at cascade.input_size -> float32 [1, 3, H, W]
    labels, exit_index = cascade.predict(x)

A stage runs only on the images still in the batch: an image whose confidence reaches the exit's threshold
leaves, and the deeper graphs never run for it (as the PyTorch model does).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import MessError
from .files import sha256_file   # hashlib only (no torch)

FORMAT = "messearch/onnx-cascade-v1"
CASCADE_FILE = "cascade.json"


def read_cascade(folder) -> dict:
    """The cascade.json of an ONNX export folder; a MessError if the folder is not one."""
    path = Path(folder) / CASCADE_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MessError(f"{folder}: not an ONNX export folder (no {CASCADE_FILE}; make one with "
                        "`messearch export ... --onnx DIR`)") from None
    except (OSError, ValueError) as e:
        raise MessError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MessError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                        f"expected {FORMAT!r}")
    return meta


class Cascade:
    """The ONNX graphs of one configuration with their exit thresholds; `cascade(x) -> (logits, exit_index, macs)`."""

    def __init__(self, folder, threads: int | None = None, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MessError("messearch.runtime needs onnxruntime: pip install 'messearch[onnx]' "
                            "(or pip install onnxruntime)") from None
        self.folder = Path(folder)
        self.meta = read_cascade(folder)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or 0)   # 0: ONNX Runtime's default (one per core)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.stages = self.meta["stages"]
        self.sessions, self.feeds = [], []
        for st in self.stages:
            path = self.folder / st["file"]
            if not path.is_file():
                raise MessError(f"{path}: missing (listed in {self.folder / CASCADE_FILE})")
            if "sha256" in st and sha256_file(path) != st["sha256"]:   # exports before the hashes were recorded lack it
                raise MessError(f"{path}: not the graph {self.folder / CASCADE_FILE} lists (its sha256 differs): the "
                                f"folder mixes two exports; export the configuration again into it")
            sess = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
            self.sessions.append(sess)
            self.feeds.append([i.name for i in sess.get_inputs()])  # the exporter drops inputs a graph never reads
        self.input_size = tuple(int(v) for v in self.meta["input_size"])
        self.num_classes = int(self.meta["num_classes"])
        self.n_exits = int(self.meta["n_exits"])
        self.class_names = list(self.meta.get("class_names", []))

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB at the input size -> float32 [1, 3, H, W], normalised as in training (bit for bit)."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise MessError(f"image of dtype {image.dtype} and shape {image.shape}: expected uint8 HxWx3 RGB")
        if tuple(image.shape[:2]) != self.input_size:
            raise MessError(f"image of size {image.shape[0]}x{image.shape[1]}: resize it to "
                            f"{self.input_size[0]}x{self.input_size[1]} first ({self.meta['resize']})")
        mean = np.asarray(self.meta["mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(self.meta["std"], dtype=np.float32)[:, None, None]
        x = image.transpose(2, 0, 1).astype(np.float32) / np.float32(self.meta["pixel_max"])
        return ((x - mean) / std)[None].astype(np.float32)

    def run(self, x: np.ndarray) -> dict:
        """Run the cascade on a float32 batch [B, 3, H, W]; returns logits [B, C, H, W], exits [B] (n_exits: the
        final head), macs [B] and confidence [B, n_exits] (NaN at the exits an image did not reach)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.input_size:
            raise MessError(f"input of shape {x.shape}: expected [B, 3, {self.input_size[0]}, {self.input_size[1]}]")
        b = x.shape[0]
        out = np.zeros((b, self.num_classes) + self.input_size, dtype=np.float32)
        exits = np.full(b, self.n_exits, dtype=np.int64)
        macs_out = np.zeros(b, dtype=np.int64)
        conf = np.full((b, self.n_exits), np.nan)
        idx = np.arange(b)                  # input position of each image still running
        macs = np.zeros(b, dtype=np.int64)
        values = {"image": x}
        for st, sess, feeds in zip(self.stages, self.sessions, self.feeds):
            if idx.size == 0:
                break
            res = dict(zip(st["outputs"], sess.run(st["outputs"], {n: values[n] for n in feeds})))
            macs += st["segment_macs"]
            j = st["exit"]
            if j is None:   # the final head: every image still running ends here
                out[idx] = res["logits"]
                macs_out[idx] = macs + st["final_macs"]
                break
            macs += st["head_macs"]
            conf[idx, j] = res["confidence"]
            # float64 >= float64, as the PyTorch model compares its confidence with the threshold
            leave = np.ones(idx.size, dtype=bool) if self.meta["static"] else res["confidence"] >= st["threshold"]
            out[idx[leave]] = res["logits"][leave]
            exits[idx[leave]] = j
            macs_out[idx[leave]] = macs[leave]
            stay = ~leave
            idx, macs = idx[stay], macs[stay]
            values = {k: v[stay] for k, v in values.items() if k.startswith("tap_")}
            values.update({k: v[stay] for k, v in res.items() if k.startswith("tap_")})
            values["features"] = res["features_out"][stay]
        return {"logits": out, "exits": exits, "macs": macs_out, "confidence": conf}

    def __call__(self, x: np.ndarray):
        r = self.run(x)
        return r["logits"], r["exits"], r["macs"]

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Class index maps [B, H, W] (int64) and the exit each image took [B]."""
        r = self.run(x)
        return r["logits"].argmax(axis=1), r["exits"]
