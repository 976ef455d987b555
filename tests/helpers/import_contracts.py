"""An import-linter contract type that import-linter lacks: a package that imports only
the standard library and itself (the node agent, which runs on nodes with nothing but
python3).  Registered in .importlinter as ``stdlib_only``.
"""

from __future__ import annotations

import sys

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output


class StdlibOnlyContract(Contract):
    """Every module of ``source_package`` imports only the standard library and modules
    of ``source_package`` itself (directly; what it imports cannot import more)."""

    type_name = "stdlib_only"

    source_package = fields.StringField()

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        package = str(self.source_package)  # type: ignore[attr-defined]
        modules = {package} | graph.find_descendants(package)
        found = []
        for importer in sorted(modules):
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                top = imported.split(".")[0]
                if imported == package or imported.startswith(package + ".") or top in sys.stdlib_module_names:
                    continue
                details = graph.get_import_details(importer=importer, imported=imported)
                lines = sorted({d["line_number"] for d in details})
                found.append({"importer": importer, "imported": imported, "lines": lines})
        return ContractCheck(kept=not found, metadata={"imports": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for item in check.metadata["imports"]:
            lines = ", ".join(f"l.{n}" for n in item["lines"]) or "?"
            output.print_error(f"{item['importer']} imports {item['imported']} ({lines}), which is neither "
                               f"the standard library nor {self.source_package}")  # type: ignore[attr-defined]
            output.new_line()
