"""The Hydra configs, installed as the package ``snvbert.conf`` (``pyproject.toml`` maps it here).

The entry points read them as ``config_path="pkg://snvbert.conf"``: from a wheel that is the copy
inside the installed package; from an editable install (``make install``) it is this folder, so
edits take effect without reinstalling. Hydra's ``pkg://`` source needs this file to exist.
"""
