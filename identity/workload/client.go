// Package workload is the node agent's side of tunmesh identity: a client
// of tunmesh-identity and a certificate manager that holds one private key
// and leaf per ServiceAccount used by pods on the node, refreshes them
// before they expire and serves them to TLS through tls.Config callbacks.
// Private keys never leave the agent's memory.
package workload

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/tunmesh/tunmesh/identity/api"
	"github.com/tunmesh/tunmesh/identity/spiffe"
)

// Certifier obtains a certificate chain (DER, leaf first) for a CSR.
type Certifier interface {
	Certify(ctx context.Context, id spiffe.ID, csrDER []byte) ([][]byte, error)
}

// Client calls tunmesh-identity over TLS, authenticating with the agent's
// projected ServiceAccount token, read from TokenFile on every call (the
// kubelet rotates it).
type Client struct {
	url       string
	tokenFile string
	http      *http.Client
}

// NewClient returns a client for the service at baseURL (https://host:port)
// that verifies the service's certificate for serverName against roots.
func NewClient(baseURL, serverName string, roots *x509.CertPool, tokenFile string) (*Client, error) {
	return NewClientWithDialer(baseURL, serverName, roots, tokenFile, nil)
}

// NewClientWithDialer is NewClient with the connections made by dial (nil:
// the default dialer). The node agent passes one that reaches the
// service's endpoints without cluster DNS; the certificate is still
// verified for serverName.
func NewClientWithDialer(baseURL, serverName string, roots *x509.CertPool, tokenFile string, dial func(ctx context.Context, network, addr string) (net.Conn, error)) (*Client, error) {
	if roots == nil {
		return nil, errors.New("identity client: nil trust anchors")
	}
	if !strings.HasPrefix(baseURL, "https://") {
		return nil, fmt.Errorf("identity client: %q is not an https URL", baseURL)
	}
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: roots, ServerName: serverName, MinVersion: tls.VersionTLS13},
		ForceAttemptHTTP2: true,
		MaxIdleConns:      4,
		IdleConnTimeout:   90 * time.Second,
		DialContext:       dial,
	}
	return &Client{
		url:       strings.TrimSuffix(baseURL, "/") + api.CertifyPath,
		tokenFile: tokenFile,
		http:      &http.Client{Transport: tr, Timeout: 30 * time.Second},
	}, nil
}

// Certify implements Certifier. A refusal is returned as *api.Error.
func (c *Client) Certify(ctx context.Context, id spiffe.ID, csrDER []byte) ([][]byte, error) {
	token, err := os.ReadFile(c.tokenFile)
	if err != nil {
		return nil, fmt.Errorf("read agent token: %w", err)
	}
	body, err := json.Marshal(api.CertifyRequest{Identity: id.String(), CSR: csrDER})
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.url, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("certify %s: %w", id, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("certify %s: %w", id, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("certify %s: read response: %w", id, err)
	}
	if resp.StatusCode != http.StatusOK {
		apiErr := &api.Error{}
		if json.Unmarshal(b, apiErr) != nil || apiErr.Code == "" {
			return nil, fmt.Errorf("certify %s: status %d: %s", id, resp.StatusCode, bytes.TrimSpace(b))
		}
		return nil, fmt.Errorf("certify %s: %w", id, apiErr)
	}
	var out api.CertifyResponse
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("certify %s: decode response: %w", id, err)
	}
	var chain [][]byte
	for _, p := range out.Chain {
		blk, _ := pem.Decode([]byte(p))
		if blk == nil || blk.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("certify %s: response holds a non-certificate", id)
		}
		chain = append(chain, blk.Bytes)
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("certify %s: empty chain", id)
	}
	return chain, nil
}

// Close releases idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }
