package secretfile

import (
	"errors"
	"io/fs"
	"os"
)

// ErrNotRegular reports a secret path that names something other than a
// regular file (after symbolic links): a directory, a device, a FIFO.
var ErrNotRegular = errors.New("not a regular file")

// OpenRegular opens path for reading when it is a regular file. Opening a
// FIFO for reading waits for a writer, so a FIFO put where a secret file
// belongs would hang whoever reads it: the worker at start, or nats.go's
// reconnect, which asks for NATS_PASSWORD_FILE holding the connection's
// lock, freezing every publish and the shutdown. The open therefore does
// not wait (openNoWait), and the file is checked before anything is read.
// Errors are *fs.PathError: they name the path, never the content.
func OpenRegular(path string) (*os.File, error) {
	f, err := openNoWait(path)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, &fs.PathError{Op: "open", Path: path, Err: ErrNotRegular}
	}
	return f, nil
}
