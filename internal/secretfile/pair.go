package secretfile

// Pair is an access key and a secret key used together to sign a request,
// each from its own Value (either may be Static).
//
// The two values change independently. A rotation writes the AK file, then
// the SK file, so a request signed between the two writes may pair the new
// AK with the old SK (or the reverse) and be refused with 401; the worker
// retries such a request, and by then both values have converged. Keep the
// old key pair valid until both files are replaced.
type Pair struct {
	AK *Value
	SK *Value
}

// Get returns the current access key and secret key. Read both once per
// request and use them together.
func (p Pair) Get() (ak, sk string) {
	return p.AK.Get(), p.SK.Get()
}

// Version increases whenever either key changes.
func (p Pair) Version() uint64 {
	return p.AK.Version() + p.SK.Version()
}

// Close stops watching both files.
func (p Pair) Close() {
	p.AK.Close()
	p.SK.Close()
}
