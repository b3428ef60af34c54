"""Extract a CustomResourceDefinition's schema for one of its versions, verbatim, as the JSON
Schema file tests/deploy/test_deploy.py validates rendered objects against (README.md names the sources).

    python tests/deploy/data/crds/extract.py CRD.yaml VERSION   # writes <group>_<plural>_<version>.json beside this file
"""

import json
import os
import sys

import yaml


def main(crd_path: str, version: str) -> str:
    crd = yaml.safe_load(open(crd_path))
    assert crd["kind"] == "CustomResourceDefinition", crd["kind"]
    spec = crd["spec"]
    (served,) = [v for v in spec["versions"] if v["name"] == version]
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{spec['group']}_{spec['names']['plural']}_{version}.json")
    with open(out, "w") as f:
        json.dump(served["schema"]["openAPIV3Schema"], f, indent=1)
        f.write("\n")
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
