from kdpipe.cli import entry

entry()
