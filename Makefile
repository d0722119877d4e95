# Convenience wrappers; ./dev does the work (it needs no make on a fresh machine).
.PHONY: run test lint bench deps
run test lint bench deps:
	./dev $@
