//go:build !unix

package secretfile

import "os"

// openNoWait is os.Open where FIFOs do not block an open (or do not
// exist).
func openNoWait(path string) (*os.File, error) { return os.Open(path) }
