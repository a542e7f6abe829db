// The Python interpreter as a ThreadSanitizer-instrumented program, for the tsan variant of the emulated
// extension: preloading libtsan into a stock python crashes at start, while a program linked with
// -fsanitize=thread starts the sanitizer before anything else runs.
#include <Python.h>

int main(int argc, char** argv) { return Py_BytesMain(argc, argv); }
