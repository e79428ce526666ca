"""The ``neurohand`` command line: :mod:`.main` builds the parser from one
module per command group (``info``, ``simulate``, ``virtual_chip``,
``virtual_hand``, ``train``, ``bundle``, ``run``, ``bench``); each registers its
subcommands and imports its heavy parts only when a command runs."""
