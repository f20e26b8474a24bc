// Boost.JSON, header-only: its compiled part, once for the server and each program that links
// its codecs (the fuzz targets), instead of a library to link.
#include <boost/json/src.hpp>
