"""Code shared by tests that run a child Python process."""

# Python source that makes the child refuse the data packages (the GPU image has none of them):
# prepend it to a `python -c` program.
BLOCK_DATA_PACKAGES = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('tensorflow_datasets', 'grain', 'array_record', 'tensorflow'):
            raise ImportError(f'blocked for this test: {name} (as on the GPU image, no data packages)')
        return None
sys.meta_path.insert(0, _Block())
"""
