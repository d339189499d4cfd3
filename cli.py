"""The operator's command line, run from a checkout: ``python cli.py --help``.

Installed, the same commands are ``cancel-scanner``; they live in ``cancel_scanner/cli.py`` so that
the wheel holds one package (``cancel_scanner``) and nothing else at the top of site-packages.
"""

from cancel_scanner.cli import main

if __name__ == "__main__":
    main()
