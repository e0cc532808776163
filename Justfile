# Recipes for common tasks. `./dev just RECIPE` runs them inside the project's virtual environment.

# List the recipes.
default:
    @just --list

# Generate a small dataset, pack, train and evaluate it on the CPU.
demo dir="demo-output":
    ./dev demo {{dir}}

# Run the test suite.
test *args:
    ./dev test {{args}}
