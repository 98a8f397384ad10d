"""The GPT model: the main decoder of `mtp_cli.models` with the MTP block of `mtp_cli.mtp`.

It sits above both packages (the MTP layers use the models' pieces; the GPT model uses both), so
neither of them imports it.
"""

from mtp_cli.gpt.model import GPTModel

__all__ = ["GPTModel"]
