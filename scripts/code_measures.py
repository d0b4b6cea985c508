"""Print the code-shape measures: the longest functions in src/ and the files over 600 lines.

Run from the repository root: python scripts/code_measures.py [--top N]
"""

import argparse
import ast
from pathlib import Path

FILE_LIMIT = 600


def function_lengths(root: Path) -> list[tuple[int, str]]:
    """(lines, "path:qualified_name") for every function and method under root."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        stack = [(tree, "")]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        lines = child.end_lineno - child.lineno + 1
                        found.append((lines, f"{path}:{name}"))
                    stack.append((child, f"{name}."))
    return sorted(found, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--root", default="src")
    args = parser.parse_args()
    root = Path(args.root)
    print(f"longest functions in {root}/:")
    for lines, where in function_lengths(root)[: args.top]:
        print(f"  {lines:5d}  {where}")
    print(f"files in {root}/ over {FILE_LIMIT} lines:")
    for path in sorted(root.rglob("*.py")):
        count = len(path.read_text(encoding="utf-8").splitlines())
        if count > FILE_LIMIT:
            print(f"  {count:5d}  {path}")


if __name__ == "__main__":
    main()
