"""Checks of the app's tasks that run INSIDE the separate MONAI Label environment (tests/monailabel/test_app.py runs
this file with that environment's Python and reads the JSON it prints).

    python venv_checks.py <exported bundle> <a study> <its class> <work folder>

monai_medmerge is made unimportable first: the infer path must work without the plugin.
"""

from __future__ import annotations

import importlib.abc
import json
import shutil
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "monailabel"


class _NoPlugin(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "monai_medmerge" or name.startswith("monai_medmerge."):
            raise ImportError(f"{name} is blocked: the infer path must not need monai_medmerge")
        return None


def main(bundle: str, image: str, expected: str, work: str) -> dict:
    sys.meta_path.insert(0, _NoPlugin())
    sys.path.insert(0, str(APP_DIR))
    import torch
    from lib.infer import ClassificationBundleInferTask
    from monailabel.interfaces.exception import MONAILabelException
    from monailabel.tasks.infer.bundle import BundleInferTask

    out: dict = {}
    task = ClassificationBundleInferTask(bundle)
    x = torch.randn(2, 1, *task.metadata["network_data_format"]["inputs"]["image"]["spatial_shape"])
    with torch.no_grad():
        random_init = task.network(x)
        loaded_net = task._get_network("cpu", None)
        loaded = loaded_net(x)
    state = torch.load(Path(bundle) / "models" / "model.pt", weights_only=True)
    out["outputs_changed_by_loading"] = not torch.allclose(random_init, loaded, atol=1e-4)
    out["loaded_equals_file"] = all(torch.equal(v, state[k]) for k, v in loaded_net.state_dict().items())
    result = task({"image": image, "device": "cpu"})[1]
    out["class"] = result["class"]
    out["expected"] = expected
    out["probabilities"] = result["probabilities"]
    # the loading transform the bundle ships (scripts/medmerge_transforms.py) names its one reader
    out["readers"] = [getattr(t, "reader_name", type(t).__name__) for t in task.pre_transforms()[:1]]
    out["plugin_imported"] = any(m.split(".")[0] == "monai_medmerge" for m in sys.modules)

    # two bundles in one app: each task's transforms come from its own scripts/, not the first one imported (the
    # code's file name: the modules are no longer in sys.modules, where inspect.getfile would look)
    other = Path(work) / "other_bundle"
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(bundle, other)
    other_task = ClassificationBundleInferTask(other)
    out["own_scripts"] = [
        Path(type(t).__call__.__code__.co_filename).resolve().is_relative_to(Path(b).resolve() / "scripts")
        for b, tk in ((bundle, task), (other, other_task))
        for t in tk.pre_transforms()
        if type(t).__module__.startswith("scripts.")
    ]
    out["scripts_left_imported"] = any(m == "scripts" or m.startswith("scripts.") for m in sys.modules)
    out["bundle_left_on_path"] = any(str(Path(b).resolve()) in sys.path for b in (bundle, other))

    # a checkpoint of a merge wrapper: the same tensors under other keys
    wrong = Path(work) / "wrong_keys"
    shutil.rmtree(wrong, ignore_errors=True)
    shutil.copytree(bundle, wrong)
    torch.save({f"merge.template.{k}": v for k, v in state.items()}, wrong / "models" / "model.pt")
    try:
        ClassificationBundleInferTask(wrong)._get_network("cpu", None)
        out["strict_error"] = None
    except MONAILabelException as e:
        out["strict_error"] = e.msg
    # MONAI Label's stock bundle task loads it non-strictly: nothing is loaded, the network stays random
    stock = BundleInferTask(str(wrong), {})
    with torch.no_grad():
        out["stock_task_silently_random"] = torch.allclose(stock._get_network("cpu", None)(x), stock.network.eval()(x))

    # the app refuses to start without a model
    import main as app_main

    try:
        app_main.MedMergeApp(str(APP_DIR), str(Path(work) / "empty_studies"), {})
        out["no_model_error"] = None
    except MONAILabelException as e:
        out["no_model_error"] = e.msg
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(*sys.argv[1:5])))
