"""Diffusion translation: the target-domain DDPM (:mod:`.ddpm`), the shared reverse loop with its
guidance hook (:mod:`.sampling`), SDEdit (:mod:`.sdedit`); SGG and PTL build on the same loop.

Submodules are imported on use (``from dasslab.diffusion import sampling``) so that importing the
package stays cheap for the CLI.
"""
