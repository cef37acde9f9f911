# Everything runs in a local virtual environment that the first target to need it creates.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install book test notebooks clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test,book]"
	touch $(STAMP)

## Build the book from the stored notebooks (no warnings allowed) and open it in a browser.
book: $(STAMP)
	$(BIN)/jupyter-book build . -W -n --keep-going
	@test -f _build/html/index.html
	-@[ -n "$$CI" ] || $(BIN)/python -m webbrowser -t "file://$(CURDIR)/_build/html/index.html" >/dev/null 2>&1

## Run every test: the library against transformers, every notebook under nbval, the book build and Chromium.
test: $(STAMP)
	$(BIN)/python -m pytest -q --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg tests notebooks

## Re-execute every notebook in place (after changing one), storing the new outputs.
notebooks: $(STAMP)
	$(BIN)/python -m jupyter nbconvert --to notebook --execute --inplace notebooks/*.ipynb
	$(BIN)/python .ci/tidy_notebooks.py notebooks/*.ipynb

clean:
	rm -rf $(VENV) _build
