//go:build unix

package secretfile

import (
	"os"
	"syscall"
)

// openNoWait opens path without waiting for a FIFO's writer. O_NONBLOCK
// changes nothing for a regular file's reads.
func openNoWait(path string) (*os.File, error) {
	return os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
}
