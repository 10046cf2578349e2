.PHONY: setup test test-all demo lint

setup:
	bash tools/setup_env.sh

test: setup
	HF_HUB_OFFLINE=1 python -m pytest -q

test-all: setup
	HF_HUB_OFFLINE=1 python -m pytest -q -m ""

lint:
	ruff check atm_lightning tests tools

# Offline end to end on scikit-learn digits (a few minutes on 2 CPU cores); writes runs/demo/.
demo: setup
	HF_HUB_OFFLINE=1 python tools/demo.py
